"""Merge finished shards: identities, duplicate flags and the dataset summary.

Runs over every shard index each time (cheap: Parquet only, no images), so it is idempotent and
its output depends only on the set of finished shards.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from fgid import grouping
from fgid.config import BuildConfig
from fgid.dataset import Dataset
from fgid.schema import REGIONS, STATUS_OK, reason_code

AGE_BINS = (0, 10, 20, 30, 40, 50, 60, 70, 80)


def read_index(out_dir: str) -> pa.Table:
    """Every shard's index rows, in shard order."""
    return Dataset(out_dir).index()


def assign_identities(ok: list[dict], config: BuildConfig) -> list[dict]:
    """One IDENTITY_SCHEMA row per kept sample, in index order."""
    if not ok:
        return []
    first_by_hash: dict[str, str] = {}
    exact = []
    for row in ok:
        exact.append(first_by_hash.setdefault(row["sha256"], row["key"]))
    emb = np.asarray([row["embedding"] for row in ok], dtype=np.float32)
    metric, threshold, near = grouping.resolve(
        emb.shape[1], config.group.metric, config.group.threshold, config.group.near_duplicate
    )
    names = [f"label-{row['label']}" if row["label"] else None for row in ok]
    unlabelled = [i for i, name in enumerate(names) if name is None]
    if unlabelled:
        clusters = grouping.cluster(emb[unlabelled], metric, threshold)
        # Named after the first member's key, not a running number: the name stays the same
        # when other identities are removed (takedowns) or added, and it never collides.
        first_key: dict[int, str] = {}
        for i, c in zip(unlabelled, clusters, strict=True):
            names[i] = f"cluster-{first_key.setdefault(int(c), ok[i]['key'])}"
    codes = {name: n for n, name in enumerate(dict.fromkeys(names))}
    near_of = grouping.near_duplicates(emb, np.asarray([codes[n] for n in names]), metric, near)
    sizes = Counter(names)
    rows = []
    for i, row in enumerate(ok):
        is_exact = exact[i] != row["key"]
        near_key = ok[near_of[i]]["key"] if near_of[i] >= 0 and not is_exact else None
        rows.append(
            {
                "key": row["key"],
                "shard": row["shard"],
                "identity": names[i],
                "identity_source": "label" if row["label"] else "cluster",
                "identity_size": sizes[names[i]],
                "duplicate_of": exact[i] if is_exact else None,
                "near_duplicate_of": near_key,
            }
        )
    return rows


def age_histogram(ages: list[float]) -> dict[str, int]:
    edges = [*AGE_BINS, 200]
    counts, _ = np.histogram(ages, bins=edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(AGE_BINS, AGE_BINS[1:], strict=False)] + ["80+"]
    return dict(zip(labels, (int(c) for c in counts), strict=True))


def summarize(index: pa.Table, identities: list[dict], out_dir: str, config: BuildConfig) -> dict:

    rows = index.to_pylist()
    ok = [r for r in rows if r["status"] == STATUS_OK]
    dataset = Dataset(out_dir)
    plan = dataset.read_plan()
    done = dataset.done_shards()
    stage_totals: dict[str, list[float]] = {}
    waited = looped = 0.0
    for shard_id in done:
        stats = dataset.read_stats(shard_id)
        for name, t in stats["stages"].items():
            acc = stage_totals.setdefault(name, [0.0, 0])
            acc[0] += t["seconds"]
            acc[1] += t["images"]
            # Shards built before read-ahead existed carry neither figure.
            waited += t.get("input_wait_seconds", 0.0)
            looped += t.get("model_loop_seconds", 0.0)
    # An identity is recognizable when it has two or more distinct images (duplicates excluded).
    distinct = Counter(
        r["identity"] for r in identities if not r["duplicate_of"] and not r["near_duplicate_of"]
    )
    per_identity = Counter(distinct.values())
    ages = [r["age"] for r in ok if r["age"] is not None]
    return {
        "complete": len(done) == len(plan),
        "shards": {"planned": len(plan), "done": len(done)},
        "inputs": {"planned": sum(len(p.items) for p in plan), "indexed": len(rows)},
        "samples": len(ok),
        "rejected": len(rows) - len(ok),
        "rejection_reasons": dict(
            sorted(Counter(reason_code(r["reason"]) for r in rows if r["reason"]).items())
        ),
        "identities": {
            "total": len(distinct),
            "recognizable": sum(1 for n in distinct.values() if n >= 2),
            "images_in_recognizable": sum(n for n in distinct.values() if n >= 2),
            "from_labels": len(
                {r["identity"] for r in identities if r["identity_source"] == "label"}
            ),
            "images_per_identity": {str(k): v for k, v in sorted(per_identity.items())},
        },
        "duplicates": {
            "exact": sum(1 for r in identities if r["duplicate_of"]),
            "near": sum(1 for r in identities if r["near_duplicate_of"]),
        },
        "age": {
            "histogram": age_histogram(ages),
            "mean": round(float(np.mean(ages)), 2) if ages else None,
            "median": float(np.median(ages)) if ages else None,
        },
        "gender": dict(sorted(Counter(r["gender"] or "unknown" for r in ok).items())),
        "regions_present": {
            name: sum(1 for r in ok if name in (r["regions"] or [])) for name in REGIONS
        },
        "embedding_dim": len(ok[0]["embedding"]) if ok else None,
        "stage_throughput": {
            name: {
                "images": int(n),
                "seconds": round(s, 3),
                "images_per_s": round(n / s, 2) if s else None,
            }
            for name, (s, n) in stage_totals.items()
        },
        # Time the model stages spent waiting for decoded input: on a GPU, its idle share.
        "model_input_wait": {
            "seconds": round(waited, 3),
            "fraction": round(waited / looped, 4) if looped else None,
        },
        "config_hash": config.output_hash(),
    }


def finalize(out_dir: str, config: BuildConfig) -> dict:
    dataset = Dataset(out_dir)
    index = dataset.index()
    ok = index.filter(pa.compute.equal(index["status"], STATUS_OK)).to_pylist()
    identities = assign_identities(ok, config)
    dataset.write_identities(identities)
    summary = summarize(index, identities, dataset.root, config)
    dataset.write_summary(summary)
    return summary
