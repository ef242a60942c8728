"""Benchmark finalize (identities, duplicates, summary) at scale. Prints figures; asserts nothing.

Each size is a synthetic build written through fgid.dataset (plan, shard indexes with 512-d
embeddings, stats files; no tars): random unit identity centres, IMAGES_PER_IDENTITY noisy images
each (cosine to the centre about 0.74, so two images of one person are at about 0.55), shuffled
over the plan, 1% exact duplicates. finalize then runs in a fresh child process, which reports
its own seconds and peak RSS, so generation never counts.

Prints one JSON line per size: samples, identities (true and found), seconds, peak_rss_mb,
and, each in a child of its own, `planning` (prepare_output of a list file naming as many
inputs) and `append` (finalize after APPEND_FRACTION more samples were appended: the new ones
are clustered against the kept identities). `--planning-sizes` adds one line per size for
planning alone, and then planning the list grown by APPEND_FRACTION with --append (the recorded
plan sorted and compared with the listing, the new inputs as new shards). `--build-sizes` adds
one line per size for a whole plain-Python build of that many small JPEGs with bench-only stub
models (bench/stub_models.py).

Run:  uv run python -m bench.scale_bench [--sizes 20000,100000] [--shard-size 10000] [--keep DIR]
      uv run python -m bench.scale_bench --sizes '' --build-sizes 1000,10000
      uv run python -m bench.scale_bench --sizes '' --planning-sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

IMAGES_PER_IDENTITY = 5
DIM = 512
NOISE = 0.9  # |noise| relative to the unit centre: cosine to the centre 1/sqrt(1 + NOISE^2)


def synthetic_faces(identities: int, per_identity: int, dim: int = DIM, seed: int = 0):
    """(embeddings, true identity per row): unit centres plus noise, rows shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.permutation(np.repeat(np.arange(identities), per_identity))
    noise = rng.standard_normal((len(truth), dim), dtype=np.float32) * (NOISE / np.sqrt(dim))
    return centres[truth] + noise, truth


def write_dataset(out: Path, samples: int, shard_size: int) -> int:
    """A finished synthetic build of `samples` kept faces; returns the true identity count."""
    from fgid.dataset import Dataset
    from fgid.inputs import InputItem, ShardPlan
    from fgid.schema import INDEX_SCHEMA, STATUS_OK

    identities = max(1, samples // IMAGES_PER_IDENTITY)
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((identities, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.permutation(np.resize(np.arange(identities), samples))
    dataset = Dataset(str(out))
    dataset.prepare()
    plans = []
    for shard_id, lo in enumerate(range(0, samples, shard_size)):
        rows = np.arange(lo, min(lo + shard_size, samples))
        keys = [hashlib.sha1(b"%d" % i).hexdigest()[:20] for i in rows]
        sources = [f"synthetic/{i:08d}.jpg" for i in rows]
        plans.append(ShardPlan(shard_id, tuple(map(InputItem, keys, sources))))
        noise = rng.standard_normal((len(rows), DIM), dtype=np.float32) * (NOISE / np.sqrt(DIM))
        emb = (centres[truth[rows]] + noise).ravel()
        # Every 100th sample repeats the content of the one before it: an exact duplicate.
        content = np.where(rows % 100 == 99, rows - 1, rows)
        n = len(rows)
        columns = {
            "key": keys,
            "shard": [shard_id] * n,
            "source": sources,
            "status": [STATUS_OK] * n,
            "reason": [None] * n,
            "sha256": [hashlib.sha256(b"%d" % c).hexdigest() for c in content],
            "label": [None] * n,
            "width": [512] * n,
            "height": [512] * n,
            "face_count": [1] * n,
            "det_score": rng.uniform(0.5, 1.0, n).astype(np.float32),
            "age": rng.uniform(5, 90, n).astype(np.float32),
            "gender": rng.choice(["female", "male"], n).tolist(),
            "regions": [["face", "eyes", "nose", "mouth"]] * n,
            "embedding": pa.ListArray.from_arrays(np.arange(n + 1, dtype=np.int32) * DIM, emb),
        }
        for name in INDEX_SCHEMA.names:  # columns this bench does not fill stay empty
            columns.setdefault(name, [None] * n)
        dataset.write_index(shard_id, pa.table(columns, schema=INDEX_SCHEMA))
        dataset.write_stats(shard_id, {"stages": {}})
    dataset.write_plan(plans)
    return identities


def run_finalize(out: str, spill: bool = False) -> None:
    """Child process: finalize `out` and print seconds, peak RSS and what it found. `spill`
    holds the embeddings in a memory-mapped file (as when they do not fit in memory); the peak
    RSS then counts the file's cached pages too, and `peak_anon_mb` (sampled) only the rest."""
    from fgid import finalize
    from fgid.config import BuildConfig

    if spill:
        finalize.SPILL_SHARE = 0.0
    anon = AnonPeak()
    start = time.perf_counter()
    summary = finalize.finalize(out, BuildConfig())
    seconds = time.perf_counter() - start
    peak_kb = peak_rss_kb()
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "peak_rss_mb": round(peak_kb / 1024),
                "peak_anon_mb": round(anon.stop() / 1024),
                "spilled": spill,
                "identities_found": summary["identities"]["total"],
                "exact_duplicates": summary["duplicates"]["exact"],
            }
        )
    )


class AnonPeak:
    """The highest RssAnon (memory not backed by a file) seen, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, status_kb("RssAnon:"))

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peak, status_kb("RssAnon:"))


APPEND_FRACTION = 0.1


def run_in_child(kind: str, **args) -> dict:
    """Run `kind` in a fresh process; its last stdout line (JSON) is the result."""
    found = subprocess.run(
        [sys.executable, "-m", "bench.scale_bench", "--child", json.dumps({"kind": kind, **args})],
        check=True,
        stdout=subprocess.PIPE,  # stderr passes through: a failure shows its traceback
        text=True,
    )
    return json.loads(found.stdout.strip().splitlines()[-1])


def peak_rss_kb() -> int:
    """This process's own peak RSS. Not ru_maxrss: Linux keeps that across exec, so a child
    would report the peak of the bench process that started it."""
    return status_kb("VmHWM:")


def status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def measured(started: float, **extra) -> None:
    peak_kb = peak_rss_kb()
    seconds = round(time.perf_counter() - started, 2)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": round(peak_kb / 1024), **extra}))


def run_child(spec: dict) -> None:
    from fgid.config import BuildConfig

    started = time.perf_counter()
    if spec["kind"] == "planning":
        from fgid.pipeline import prepare_output

        config, append = BuildConfig(shard_size=10_000), spec.get("append", False)
        plans = prepare_output([spec["listing"]], spec["out"], config, append)
        measured(started, inputs=sum(p.size for p in plans), shards=len(plans))
    elif spec["kind"] == "append":
        from fgid.finalize import finalize

        summary = finalize(spec["out"], BuildConfig())
        measured(started, identities_found=summary["identities"]["total"])
    elif spec["kind"] == "build":
        from bench.stub_models import stub_model_set
        from fgid.pipeline import build

        config = BuildConfig(shard_size=1000, batch_size=32, align={"size": 128})
        summary = build([spec["inputs"]], spec["out"], config, stub_model_set())
        measured(started, samples=summary["samples"])


def write_listing(path: Path, count: int) -> None:
    """A list file naming `count` inputs (never read: planning does not open them)."""
    with open(path, "w") as handle:
        for lo in range(0, count, 100_000):
            handle.writelines(
                f"/data/faces/{i:09d}.jpg\n" for i in range(lo, min(lo + 100_000, count))
            )


def append_dataset(out: Path, samples: int, added: int, shard_size: int) -> None:
    """Grow a finalized synthetic build by `added` samples as `fgid build --append` does: new
    shards after the old ones, the plan extended, a history record. Half the new faces are of
    people already in it (write_dataset's centres), half of new people."""
    from fgid import history
    from fgid.dataset import Dataset
    from fgid.inputs import InputItem, PlannedShard, ShardPlan
    from fgid.planfile import copy_plan, write_plan
    from fgid.schema import INDEX_SCHEMA, STATUS_OK

    identities = max(1, samples // IMAGES_PER_IDENTITY)
    centres = np.random.default_rng(1).standard_normal((identities, DIM), dtype=np.float32)
    rng = np.random.default_rng(2)
    fresh = rng.standard_normal((max(1, added // (2 * IMAGES_PER_IDENTITY)), DIM), np.float32)
    centres = np.concatenate([centres, fresh])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    known = rng.integers(0, identities, added - added // 2)
    new = identities + rng.integers(0, len(fresh), added // 2)
    truth = rng.permutation(np.concatenate([known, new]))
    dataset = Dataset(str(out))
    first = 1 + max(dataset.done_shards())
    plans = []
    for n, lo in enumerate(range(0, added, shard_size)):
        shard_id, rows = first + n, np.arange(lo, min(lo + shard_size, added))
        keys = [hashlib.sha1(b"added %d" % i).hexdigest()[:20] for i in rows]
        sources = [f"synthetic/added-{i:08d}.jpg" for i in rows]
        plans.append(ShardPlan(shard_id, tuple(map(InputItem, keys, sources))))
        noise = rng.standard_normal((len(rows), DIM), dtype=np.float32) * (NOISE / np.sqrt(DIM))
        emb = (centres[truth[rows]] + noise).ravel()
        k = len(rows)
        columns = {
            "key": keys,
            "shard": [shard_id] * k,
            "source": sources,
            "status": [STATUS_OK] * k,
            "sha256": [hashlib.sha256(b"added %d" % i).hexdigest() for i in rows],
            "face_count": [1] * k,
            "age": rng.uniform(5, 90, k).astype(np.float32),
            "gender": rng.choice(["female", "male"], k).tolist(),
            "regions": [["face"]] * k,
            "embedding": pa.ListArray.from_arrays(np.arange(k + 1, dtype=np.int32) * DIM, emb),
        }
        for name in INDEX_SCHEMA.names:
            columns.setdefault(name, [None] * k)
        dataset.write_index(shard_id, pa.table(columns, schema=INDEX_SCHEMA))
        dataset.write_stats(shard_id, {"stages": {}, "ok": k})
    history.start(dataset, history.APPEND, [PlannedShard(p.shard_id, len(p.items)) for p in plans],
                  ["synthetic"])  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        added = str(Path(folder, "added"))
        Path(added).mkdir()
        write_plan(added, plans)
        copy_plan(str(Path(added, "plan.parquet")), str(out), after_recorded=True)


def write_images(folder: Path, count: int) -> None:
    """`count` distinct 128x128 JPEGs (noise: the stub embedder gives each its own identity)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (128, 128, 3), np.uint8)
    for i in range(count):
        image = base.copy()
        image[0, :8] = np.frombuffer(i.to_bytes(24, "little"), np.uint8).reshape(8, 3)
        Image.fromarray(image).save(folder / f"{i:07d}.jpg", quality=90)


def build_lines(root: Path, sizes: list[int]) -> None:
    for size in sizes:
        inputs, out = root / f"images{size}", root / f"build{size}"
        write_images(inputs, size)
        result = run_in_child("build", inputs=str(inputs), out=str(out))
        print(json.dumps({"build_inputs": size, **result}), flush=True)
        shutil.rmtree(out)
        shutil.rmtree(inputs)


def planning_lines(root: Path, sizes: list[int]) -> None:
    for size in sizes:
        listing, out = root / f"list{size}.txt", root / f"planned{size}"
        write_listing(listing, size)
        result = run_in_child("planning", listing=str(listing), out=str(out))
        # The same list grown by APPEND_FRACTION, planned with --append: the recorded plan is
        # sorted and compared with the listing, and the new inputs become new shards.
        write_listing(listing, size + int(size * APPEND_FRACTION))
        again = run_in_child("planning", listing=str(listing), out=str(out), append=True)
        print(json.dumps({"planning_inputs": size, **result, "append": again}), flush=True)
        shutil.rmtree(out)
        listing.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,100000", help="comma-separated sample counts")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--keep", help="write the synthetic builds here and keep them")
    parser.add_argument(
        "--spill", action="store_true", help="finalize from a memory-mapped embeddings file"
    )
    parser.add_argument("--finalize", help=argparse.SUPPRESS)  # the child's entry point
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the other children's
    parser.add_argument("--build-sizes", default="", help="whole builds with stub models")
    parser.add_argument("--planning-sizes", default="", help="planning only, of this many inputs")
    args = parser.parse_args()
    if args.finalize:
        run_finalize(args.finalize, args.spill)
        return
    if args.child:
        run_child(json.loads(args.child))
        return
    root = Path(args.keep or tempfile.mkdtemp(prefix="fgid-scale-"))
    try:
        for size in (int(s) for s in args.sizes.split(",") if s):
            out = root / f"n{size}"
            start = time.perf_counter()
            identities = write_dataset(out, size, args.shard_size)
            written = time.perf_counter() - start
            child = subprocess.run(
                [sys.executable, "-m", "bench.scale_bench", "--finalize", str(out)]
                + ["--spill"] * args.spill,
                check=True,
                stdout=subprocess.PIPE,  # stderr passes through: a failure shows its traceback
                text=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            line = {"samples": size, "identities": identities, "dim": DIM, **result}
            listing = root / f"n{size}.txt"
            write_listing(listing, size)
            line["planning"] = run_in_child(
                "planning", listing=str(listing), out=str(root / f"plan{size}")
            )
            added = max(1, int(size * APPEND_FRACTION))
            append_dataset(out, size, added, args.shard_size)
            line["append"] = {"added": added, **run_in_child("append", out=str(out))}
            shutil.rmtree(root / f"plan{size}")
            print(json.dumps({**line, "write_seconds": round(written, 1)}), flush=True)
            if not args.keep:
                shutil.rmtree(out)
        build_lines(root, [int(s) for s in args.build_sizes.split(",") if s])
        planning_lines(root, [int(s) for s in args.planning_sizes.split(",") if s])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
