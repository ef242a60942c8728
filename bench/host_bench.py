"""Benchmark the build's own host work: one shard of 1024x1024 JPEGs through
fgid.pipeline.process_shard with bench-only stub models (bench/stub_models.py), so decoding,
aligning, encoding and writing are what is timed. On a GPU these bound the stages before
captions; this measures them on any machine. Prints one JSON line per decode_workers setting.

Run:  uv run python -m bench.host_bench [--images 192] [--batch-size 64] [--workers 1,2,8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.gpu_bench import make_inputs, run_pipeline
from bench.stub_models import stub_model_set
from fgid.config import BuildConfig


def measure(files: list[str], work: Path, workers: int, batch: int, repeat: int) -> dict:
    config = BuildConfig(batch_size=batch, prefetch_batches=2, decode_workers=workers)
    models = stub_model_set()
    run_pipeline(files[:8], work / "warm", config, models)
    rates, stats = [], None
    for i in range(repeat):
        started = time.perf_counter()
        stats = run_pipeline(files, work / f"run-{workers}-{i}", config, models)
        rates.append(len(files) / (time.perf_counter() - started))
    decode = stats["stages"]["decode"]
    return {
        "images": len(files),
        "decode_workers": workers,
        "images_per_s": statistics.median(rates),
        "runs_images_per_s": [round(r, 1) for r in rates],
        "input_wait_fraction": decode["input_wait_fraction"],
        # The main thread's time per image that is neither waiting for input nor a stage:
        # sample metadata, encoding (when not side by side) and writing.
        "main_thread_other_ms": 1000
        * (
            decode["model_loop_seconds"]
            - decode["input_wait_seconds"]
            - sum(s["seconds"] for n, s in stats["stages"].items() if n != "decode")
        )
        / len(files),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="1,2", help="decode_workers settings, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting (median)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fgid-host-bench-"))
    try:
        files = make_inputs(work, args.images)
        for workers in (int(w) for w in args.workers.split(",")):
            print(json.dumps(measure(files, work, workers, args.batch_size, args.repeat)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
