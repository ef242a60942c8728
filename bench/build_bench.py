"""Benchmark the FGID build on the lite model set (CPU). Prints figures and ratios; asserts nothing.

Inputs: JPEGs made from the demo photos (fgid.samples) and flipped, cropped, brightened variants.
1. Per-stage and end-to-end images/s of a plain-Python build (fgid.pipeline.build, shard stats).
2. Prefect overhead: the same inputs built into fresh folders by fgid.pipeline.build and by the
   `build` flow (ThreadPoolTaskRunner(max_workers=1)), alternating which goes first, after the
   model set is loaded and warmed. The flow uses a real `prefect server start` subprocess
   (temporary PREFECT_HOME), started beforehand and timed on its own. Prefect seconds = the flow
   call plus draining the client's log/event queues.
3. Shard-write MB/s of the built members, repeated to --write-mb: fgid's ShardWriter (add +
   commit) vs plain `tarfile` (defaults) and webdataset's TarWriter, each with its fsyncs.

Prefect's cost is mostly per flow run, not per shard: about 1 s, half of it joining the flow-run
heartbeat thread (it sleeps in 1 s steps), the rest API calls and artifacts. So the ratio falls as
a build grows; prefect_in_shards_ratio isolates the per-shard part.

Run:  uv run python bench/build_bench.py [--images 192] [--shard-size 32] [--repeat 2]
                                         [--write-mb 300] [--out DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageEnhance, ImageOps

from fgid.config import BuildConfig
from fgid.models import leased_model_set
from fgid.pipeline import build as build_plain
from fgid.protocols import Attributes, Detection
from fgid.sample import Sample
from fgid.samples import write_samples
from fgid.writer import ShardWriter

STAGES = ["decode", "detect", "align", "parse", "embed", "attributes", "caption"]


def variant(im: Image.Image, k: int) -> Image.Image:
    """Variant k % 6 of a photo: as is, mirrored, cropped, darker, mirrored brighter, both."""
    k, w, h = k % 6, im.width // 12, im.height // 12
    im = ImageOps.mirror(im) if k in (1, 4, 5) else im
    im = im.crop((w, h, 11 * w, 11 * h)) if k in (2, 5) else im
    return ImageEnhance.Brightness(im).enhance(0.75 if k == 3 else 1.25) if k in (3, 4) else im


def make_inputs(folder: Path, count: int) -> str:
    """Write `count` JPEGs: each demo photo that decodes, in turn, through each variant."""
    bases = []
    for path in write_samples(folder / "demo"):
        with contextlib.suppress(OSError):  # the demo set holds one deliberately broken file
            bases.append(Image.open(path).convert("RGB"))
    out = folder / "inputs"
    out.mkdir(parents=True)
    for i in range(count):
        variant(bases[i % len(bases)], i // len(bases)).save(out / f"img{i:04d}.jpg", quality=92)
    return str(out)


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[float]:
    """Run `prefect server start` on a free port, point this process at it; yields start-up s."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{port}/api"
    os.environ.update(PREFECT_HOME=str(home), PREFECT_API_URL=api,
                      PREFECT_SERVER_ANALYTICS_ENABLED="false")  # fmt: skip
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    started = time.perf_counter()
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        try:
            while proc.poll() is None and time.perf_counter() - started < 120:
                with contextlib.suppress(OSError), urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"prefect server not healthy; see {home / 'server.log'}")
            yield time.perf_counter() - started
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            proc.kill()
            proc.wait()


def preload(config: BuildConfig) -> None:
    """Load one model set into the idle pool; both build paths then lease that same set."""
    with leased_model_set(config):
        pass


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def time_prefect(inputs: list[str], out: Path, config: BuildConfig) -> tuple[float, float]:
    """Seconds for the flow call, and for draining the client's log and event queues after it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.build import build as build_flow

    flow_fn = build_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    flow_s = timed(flow_fn, inputs=inputs, out=str(out), config=config)
    return flow_s, timed(APILogWorker.drain_all) + timed(EventsWorker.drain_all)


def build_bench(inputs: str, work: Path, config: BuildConfig, repeat: int) -> dict:
    """Plain and Prefect builds of the same inputs, alternating which goes first."""
    figures = {"model_load_s": timed(preload, config)}
    warm = sorted(glob.glob(f"{inputs}/*"))[:2]
    figures["warmup_s"] = timed(build_plain, warm, work / "warm", config)
    plain, prefect = [], []
    with prefect_server(work / "prefect-home") as figures["prefect_server_startup_s"]:
        for i in range(repeat):
            if i % 2:
                prefect.append(time_prefect([inputs], work / f"prefect-{i}", config))
            plain.append(timed(build_plain, [inputs], work / f"plain-{i}", config))
            if not i % 2:
                prefect.append(time_prefect([inputs], work / f"prefect-{i}", config))
    med = statistics.median
    figures.update(plain_runs_s=plain, prefect_runs_s=[f + d for f, d in prefect])
    figures.update(plain_s=med(plain), prefect_s=med(figures["prefect_runs_s"]),
                   prefect_flush_s=med(d for _, d in prefect))  # fmt: skip
    for kind in ("plain", "prefect"):  # time inside process_shard: slowdown of the work itself
        runs = [shard_stats(work / f"{kind}-{i}") for i in range(repeat)]
        figures[f"{kind}_in_shards_s"] = med(sum(st["wall_seconds"] for st in r) for r in runs)
    figures["prefect_extra_s"] = figures["prefect_s"] - figures["plain_s"]
    # The work itself under Prefect vs plain; the rest of prefect_extra_s is per flow run.
    figures["prefect_in_shards_ratio"] = (
        figures["prefect_in_shards_s"] / figures["plain_in_shards_s"]
    )
    figures["prefect_overhead_ratio"] = figures["prefect_s"] / figures["plain_s"]
    return figures


def shard_stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.stats.json"))]


def stage_rates(out: Path) -> dict:
    """images/s per stage over every shard (seconds from each shard's unrounded rate)."""
    seconds, images = Counter(), Counter()
    for stats in shard_stats(out):
        for name, t in stats["stages"].items():
            images[name] += t["images"]
            seconds[name] += t["images"] / t["images_per_s"] if t["images_per_s"] else 0.0
    return {f"{n}_images_per_s": images[n] / seconds[n] if seconds[n] else None for n in STAGES}


def read_shards(out: Path) -> list[tuple[dict, dict[str, bytes]]]:
    """(index row, members) for every sample in the built tars, in tar order."""
    rows = {}
    for path in sorted((out / "shards").glob("*.parquet")):
        rows.update({r["key"]: r for r in pq.read_table(path).to_pylist()})
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [(rows[key], members) for key, members in samples.items()]


def sample_from_row(row: dict, key: str) -> Sample:
    """A Sample with what the writer's index row reads, so ShardWriter.add does its real work."""
    face = Detection(box=np.zeros(4, np.float32), score=row["det_score"],
                     landmarks=np.zeros((5, 2), np.float32))  # fmt: skip
    return Sample(key, 0, row["source"], row["label"], sha256=row["sha256"], width=row["width"],
                  height=row["height"], face_count=row["face_count"], face=face,
                  attributes=Attributes(row["age"], row["gender"]), regions=row["regions"],
                  embedding=np.asarray(row["embedding"], np.float32))  # fmt: skip


def fsync(handle) -> None:  # as fgid's atomic_open does before its rename
    handle.flush()
    os.fsync(handle.fileno())


def write_fgid(folder: Path, items: list) -> None:
    writer = ShardWriter(folder, 0)
    for key, row, members in items:
        writer.add(sample_from_row(row, key), members)
    writer.commit({})  # the tar is closed and fsynced, then the index and stats


def write_tarfile(folder: Path, items: list) -> None:
    with open(folder / "plain.tar", "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w") as tar:
            for key, _, members in items:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        fsync(handle)


def write_wds(folder: Path, items: list) -> None:
    with open(folder / "wds.tar", "wb") as handle:
        writer = wds.TarWriter(handle, mtime=0)
        for key, _, members in items:
            writer.write({"__key__": key, **members})
        writer.close()
        fsync(handle)


def write_bench(built: Path, work: Path, target_mb: float, repeat: int) -> dict:
    """MB/s of each tar writer over the same members; median of `repeat` rotated-order rounds."""
    samples = read_shards(built)
    once = sum(len(d) for _, members in samples for d in members.values())
    copies = max(1, round(target_mb * 1e6 / once))
    items = [(f"r{c:04d}_{row['key']}", row, m) for c in range(copies) for row, m in samples]
    writers = [("shardwriter", write_fgid), ("tarfile", write_tarfile), ("webdataset", write_wds)]
    seconds: dict[str, list[float]] = {name: [] for name, _ in writers}
    for i in range(repeat):
        for name, write in writers[i % 3 :] + writers[: i % 3]:
            folder = work / name
            folder.mkdir(parents=True)
            seconds[name].append(timed(write, folder, items))
            shutil.rmtree(folder)
    mb = once * copies / 1e6
    rates = {f"{name}_mb_per_s": mb / statistics.median(s) for name, s in seconds.items()}
    rates["shard_write_ratio"] = rates["shardwriter_mb_per_s"] / rates["tarfile_mb_per_s"]
    return {"write_mb": round(mb, 1), "write_samples": len(items), **rates}


def report(figures: dict) -> None:
    targets = {"prefect_overhead_ratio": "target <= 1.05", "shard_write_ratio": "target >= 0.8"}
    print("\n== fgid build bench (lite models, CPU) ==")
    for name, value in figures.items():
        if isinstance(value, list):
            value = " ".join(f"{v:.2f}" for v in value)
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{name:32s} {text}" + (f" ({targets[name]})" if name in targets else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="timings per figure (median)")
    parser.add_argument("--write-mb", type=float, default=300.0, help="data per tar-writer run")
    parser.add_argument("--out", type=Path, help="work folder, kept (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="fgid-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = BuildConfig(models={"set": "lite"}, shard_size=args.shard_size)
    figures = {"images": args.images, "shards": -(-args.images // args.shard_size)}
    try:
        inputs = make_inputs(work, args.images)
        figures.update(build_bench(inputs, work, config, args.repeat))
        figures.update(stage_rates(work / "plain-0"))
        figures["end_to_end_images_per_s"] = args.images / figures["plain_s"]
        figures.update(write_bench(work / "plain-0", work / "write", args.write_mb, args.repeat))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
