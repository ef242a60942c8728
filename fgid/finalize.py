"""Merge finished shards: identities, duplicate flags and the dataset summary.

Runs over every shard index each time (cheap: Parquet only, no images), so it is idempotent and
its output depends only on the set of finished shards, and, after an append (fgid.history), on the
identities the samples of the earlier builds already had, which it keeps.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import storage
from fgid import grouping, history
from fgid.config import BuildConfig
from fgid.dataset import IDENTITIES_FILE, Dataset
from fgid.schema import INDEX_SCHEMA, REGIONS, STATUS_OK, reason_code
from storage.scratch import scratch

AGE_BINS = (0, 10, 20, 30, 40, 50, 60, 70, 80)
# Embeddings that would take more than this share of the memory available are held in a
# memory-mapped temporary file instead (under TMPDIR): 10M 512-d faces are 20 GB. Clustering reads
# them in plan order, so the page cache serves them; only the file's size must fit on disk.
SPILL_SHARE = 0.5

log = logging.getLogger(__name__)


def read_index(out_dir: str, columns: list[str] | None = None) -> pa.Table:
    """Every shard's index rows, in shard order."""
    return Dataset(out_dir).index(columns)


def read_embeddings(dataset: Dataset, kept: pa.Table, spill_dir: str | None = None) -> np.ndarray:
    """The embeddings of `kept` (the index's ok rows, in order) as one float32 (rows, dim) array,
    read one shard at a time: the column never exists whole as Arrow lists or Python floats.
    With `spill_dir`, an array too big for memory (SPILL_SHARE) is a memory-mapped file there."""
    shards = kept["shard"].to_numpy()
    if not len(shards):  # nothing kept: no rows, and no width to read
        return np.zeros((0, 0), np.float32)
    starts = np.r_[0, np.flatnonzero(np.diff(shards)) + 1, len(shards)]
    embeddings = np.zeros((len(shards), 0), np.float32)
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        table = dataset.read_index(int(shards[lo]), ["key", "status", "embedding"])
        table = table.filter(pc.equal(table["status"], STATUS_OK))
        values = table["embedding"].combine_chunks()
        if not table["key"].equals(kept["key"].slice(lo, hi - lo)):
            raise ValueError(f"shard {shards[lo]}: index rows changed while finalizing")
        dim = len(values.flatten()) // max(len(values), 1)
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        if values.null_count or (lengths != dim).any():
            raise ValueError(f"shard {shards[lo]}: kept rows without a {dim}-d embedding")
        if embeddings.shape[1] != dim:
            if lo:
                raise ValueError(f"shard {shards[lo]}: {dim}-d embeddings among others")
            embeddings = _allocate(len(shards), dim, spill_dir)
        embeddings[lo:hi] = values.flatten().to_numpy().reshape(-1, dim)
    return embeddings


# A container's memory limit and use (cgroup v2, then v1): /proc/meminfo shows the host's.
CGROUP_MEMORY = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def memory_available() -> int | None:
    """Bytes that can be allocated without swapping (Linux: MemAvailable, or less where this
    process's cgroup limit leaves less); None where unknown."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in CGROUP_MEMORY:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            left = max(0, int(limit) - usage)
            found = left if found is None else min(found, left)
        break
    return found


def _allocate(rows: int, dim: int, spill_dir: str | None) -> np.ndarray:
    nbytes = rows * dim * 4
    available = memory_available()
    if spill_dir is None or available is None or nbytes <= SPILL_SHARE * available:
        return np.empty((rows, dim), np.float32)
    free = shutil.disk_usage(spill_dir).free
    if free < nbytes * 1.05:
        # A mapped file that cannot grow kills the process (SIGBUS) at the first page written
        # past the end of the disk: try memory instead, and say how to give it room.
        log.warning(
            "embeddings take %.1f GB but %s has %.1f GB free: holding them in memory (%.1f GB "
            "available); point TMPDIR at a disk with room",
            nbytes / 1e9,
            spill_dir,
            free / 1e9,
            available / 1e9,
        )
        return np.empty((rows, dim), np.float32)
    path = Path(spill_dir) / "embeddings.f32"
    log.info(
        "embeddings take %.1f GB, more than %d%% of the %.1f GB of memory available: "
        "holding them in a memory-mapped file in %s",
        nbytes / 1e9,
        round(SPILL_SHARE * 100),
        available / 1e9,
        spill_dir,
    )
    return np.memmap(path, np.float32, mode="w+", shape=(rows, dim))


def assign_identities(
    kept: pa.Table,
    embeddings: np.ndarray,
    config: BuildConfig,
    previous: tuple[pa.Array, pa.Array] | None = None,
) -> pa.Table:
    """One IDENTITY_SCHEMA row per kept sample, in index order; `previous` as grouping.assign."""
    metric, threshold, near = grouping.resolve(
        embeddings.shape[1],
        config.group.metric,
        config.group.threshold,
        config.group.near_duplicate,
    )
    return grouping.assign(
        kept, embeddings, metric, threshold, near, previous, device=config.models.device
    )


def previous_identities(dataset: Dataset, kept: pa.Table) -> tuple[pa.Array, pa.Array] | None:
    """identity and identity_source per kept row from identities.parquet, for the rows of shards
    before the latest append (fgid.history); null elsewhere. None before any append.

    What is kept is decided by shard, not by what identities.parquet holds, so finalize gives
    the same result however often it ran before (a killed append reruns byte-identically)."""
    boundary = history.boundary(dataset)
    if not boundary or not storage.exists(dataset.path(IDENTITIES_FILE)):
        return None
    recorded = dataset.identities(["key", "identity", "identity_source"])
    where = pc.index_in(kept["key"], value_set=recorded["key"].combine_chunks())
    where = pc.if_else(pc.less(kept["shard"], boundary), where, pa.scalar(None, pa.int32()))
    return recorded["identity"].take(where), recorded["identity_source"].take(where)


def age_histogram(ages: list[float]) -> dict[str, int]:
    edges = [*AGE_BINS, 200]
    counts, _ = np.histogram(ages, bins=edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(AGE_BINS, AGE_BINS[1:], strict=False)] + ["80+"]
    return dict(zip(labels, (int(c) for c in counts), strict=True))


def value_counts(column) -> dict:
    counts = pc.value_counts(column)
    values, numbers = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    return dict(zip(values, numbers, strict=True))


def summarize(
    index: pa.Table,
    identities: pa.Table,
    out_dir: str,
    config: BuildConfig,
    embedding_dim: int | None = None,
) -> dict:
    # Columns, not rows: a million index rows as Python dicts would take gigabytes.
    ok = index.filter(pc.equal(index["status"], STATUS_OK))
    dataset = Dataset(out_dir)
    plan = dataset.outline()
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
    plain = pc.and_(
        pc.is_null(identities["duplicate_of"]), pc.is_null(identities["near_duplicate_of"])
    )
    distinct = value_counts(identities.filter(plain)["identity"])
    per_identity = Counter(distinct.values())
    ages = ok["age"].drop_null().to_numpy().astype(np.float64)
    regions = value_counts(pc.list_flatten(ok["regions"]))
    labelled = identities.filter(pc.equal(identities["identity_source"], "label"))
    return {
        "complete": len(done) == len(plan),
        "shards": {"planned": len(plan), "done": len(done)},
        "inputs": {"planned": sum(p.size for p in plan), "indexed": index.num_rows},
        "samples": ok.num_rows,
        "rejected": index.num_rows - ok.num_rows,
        "rejection_reasons": dict(
            sorted(Counter(reason_code(r) for r in index["reason"].to_pylist() if r).items())
        ),
        "identities": {
            "total": len(distinct),
            "recognizable": sum(1 for n in distinct.values() if n >= 2),
            "images_in_recognizable": sum(n for n in distinct.values() if n >= 2),
            "from_labels": pc.count_distinct(labelled["identity"]).as_py(),
            "images_per_identity": {str(k): v for k, v in sorted(per_identity.items())},
        },
        "duplicates": {
            "exact": pc.count(identities["duplicate_of"]).as_py(),
            "near": pc.count(identities["near_duplicate_of"]).as_py(),
        },
        "age": {
            "histogram": age_histogram(ages),
            "mean": round(float(np.mean(ages)), 2) if len(ages) else None,
            "median": float(np.median(ages)) if len(ages) else None,
        },
        "gender": dict(sorted(Counter(g or "unknown" for g in ok["gender"].to_pylist()).items())),
        "regions_present": {name: regions.get(name, 0) for name in REGIONS},
        "embedding_dim": embedding_dim,
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


# What grouping reads of the index; the summary's columns are read after the embeddings are gone.
GROUPING_COLUMNS = ["key", "shard", "status", "sha256", "label"]


def finalize(out_dir: str, config: BuildConfig) -> dict:
    dataset = Dataset(out_dir)
    index = dataset.index(GROUPING_COLUMNS)
    kept = index.filter(pc.equal(index["status"], STATUS_OK))
    del index
    with scratch("finalize") as spill:
        embeddings = read_embeddings(dataset, kept, spill)
        previous = previous_identities(dataset, kept)
        identities = assign_identities(kept, embeddings, config, previous)
        dim = embeddings.shape[1] if kept.num_rows else None
        del embeddings, kept  # the largest things finalize holds; the summary needs neither
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed blocks otherwise
    dataset.write_identities(identities)
    index = dataset.index([name for name in INDEX_SCHEMA.names if name != "embedding"])
    summary = summarize(index, identities, dataset.root, config, dim)
    dataset.write_summary(summary)
    return summary
