"""Benchmark finalize (identities, duplicates, summary) at scale. Prints figures; asserts nothing.

Each size is a synthetic build written through fgid.dataset (plan, shard indexes with 512-d
embeddings, stats files; no tars): random unit identity centres, IMAGES_PER_IDENTITY noisy images
each (cosine to the centre about 0.74, so two images of one person are at about 0.55), shuffled
over the plan, 1% exact duplicates. finalize then runs in a fresh child process, which reports
its own seconds and peak RSS, so generation never counts.

Prints one JSON line per size: samples, identities (true and found), seconds, peak_rss_mb.

Run:  uv run python -m bench.scale_bench [--sizes 20000,100000] [--shard-size 10000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
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


def run_finalize(out: str) -> None:
    """Child process: finalize `out` and print seconds, peak RSS and what it found."""
    from fgid.config import BuildConfig
    from fgid.finalize import finalize

    start = time.perf_counter()
    summary = finalize(out, BuildConfig())
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "peak_rss_mb": round(peak_kb / 1024),
                "identities_found": summary["identities"]["total"],
                "exact_duplicates": summary["duplicates"]["exact"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,100000", help="comma-separated sample counts")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--keep", help="write the synthetic builds here and keep them")
    parser.add_argument("--finalize", help=argparse.SUPPRESS)  # the child's entry point
    args = parser.parse_args()
    if args.finalize:
        run_finalize(args.finalize)
        return
    root = Path(args.keep or tempfile.mkdtemp(prefix="fgid-scale-"))
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            out = root / f"n{size}"
            start = time.perf_counter()
            identities = write_dataset(out, size, args.shard_size)
            written = time.perf_counter() - start
            child = subprocess.run(
                [sys.executable, "-m", "bench.scale_bench", "--finalize", str(out)],
                check=True,
                stdout=subprocess.PIPE,  # stderr passes through: a failure shows its traceback
                text=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            line = {"samples": size, "identities": identities, "dim": DIM, **result}
            print(json.dumps({**line, "write_seconds": round(written, 1)}), flush=True)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
