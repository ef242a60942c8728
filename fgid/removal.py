"""Take samples down from a built dataset: every shard, index and the plan, with a record.

Rows are deleted, not tombstoned (a source path can name a person); `removals/<id>.json` keeps
only keys, shards and content sha256s: proof of the removal, and what keeps a rebuild from adding
them back. It is written "pending" first and "done" last, every file is replaced atomically, so
an interrupted removal leaves whole files and the next removal completes it. Sources are paths or
content sha256s (a requester's copy of a photo). Caption journals a crashed build or caption run
left behind lose the removed samples' captions too. Not to be run while a build writes the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import storage
from fgid.caption_journal import purge
from fgid.card import write_card
from fgid.config import BuildConfig
from fgid.finalize import finalize
from fgid.inputs import PLAN_FILE, ShardPlan, plans_from_table, sample_key, write_plan
from fgid.schema import INDEX_SCHEMA, STATUS_OK, reason_code
from fgid.writer import JOURNAL_SUFFIX, add_member, rewrite_tar, shard_paths

REMOVALS_DIR = "removals"
PENDING, DONE = "pending", "done"
_SHA256 = re.compile(r"(?:sha256:)?([0-9a-f]{64})")


class RemovalPending(RuntimeError):
    """A removal was interrupted; it must be completed before the output is built on."""


def removal_records(out_dir: str) -> list[dict]:
    """Every removal record of a dataset, oldest first."""
    urls = storage.list_files(storage.join(str(out_dir), REMOVALS_DIR), "*.json")
    return [json.loads(storage.read_text(url)) for url in urls]


def without_removed(plans: list[ShardPlan], out_dir: str) -> list[ShardPlan]:
    """The plan minus removed samples (shard ids unchanged, emptied shards dropped)."""
    records = removal_records(out_dir)
    pending = [r["id"] for r in records if r["status"] != DONE]
    if pending:
        raise RemovalPending(
            f"{out_dir} has an unfinished removal ({', '.join(pending)}); run the same "
            "`fgid remove` again to complete it, then build"
        )
    removed = {s["key"] for r in records for s in r["samples"]}
    kept = [ShardPlan(p.shard_id, tuple(i for i in p.items if i.key not in removed)) for p in plans]
    return [p for p in kept if p.items]


def recorded_config(out_dir: str) -> BuildConfig:
    """The configuration the dataset was built with (finalize needs its grouping settings)."""
    info = json.loads(storage.read_text(storage.join(str(out_dir), "build.json")))
    return BuildConfig.model_validate(info["config"])


def remove_samples(
    out_dir: str,
    *,
    identity: str | None = None,
    sources: list[str] | None = None,
    reason: str,
    config: BuildConfig | None = None,
) -> dict:
    """Remove one identity or a list of sources everywhere; returns the finished record."""
    out = str(out_dir)
    if (identity is None) == (sources is None):
        raise ValueError("give exactly one of identity or sources")
    if not reason.strip():
        raise ValueError("a reason is required (a ticket number, not a name)")
    config = config or recorded_config(out)
    resumed = resume_removals(out, config)
    records = removal_records(out)
    if identity is not None:
        request = {"identity": identity}
        again = [r for r in resumed if r["request"] == request]
        samples = [] if again else _by_identity(out, identity, records)
    else:
        request = {"sources": len(sources)}  # the entries themselves may be personal
        again, samples = _by_sources(out, sources, records)
    if not samples:  # the request was carried out already (an interrupted run, completed now)
        return {**again[-1], "resumed": [r["id"] for r in resumed], "shards": {}}
    samples.sort(key=lambda s: (s["shard"], s["key"]))
    created = datetime.now(UTC)
    digest = hashlib.sha256("\n".join(s["key"] for s in samples).encode()).hexdigest()[:8]
    record = {
        "id": f"{created:%Y%m%dT%H%M%S}Z-{digest}",
        "status": PENDING,
        "reason": reason,
        "request": request,
        "created": created.isoformat(timespec="seconds"),
        "completed": None,
        "samples": samples,
    }
    shards = _apply(out, record, config)
    return {**record, "resumed": [r["id"] for r in resumed], "shards": shards}


def resume_removals(out_dir: str, config: BuildConfig | None = None) -> list[dict]:
    """Complete every interrupted removal; returns their finished records."""
    pending = [r for r in removal_records(out_dir) if r["status"] != DONE]
    for record in pending:
        _apply(str(out_dir), record, config or recorded_config(out_dir))
    return pending


def _by_identity(out: str, identity: str, records: list[dict]) -> list[dict]:
    # Cluster names are positions, renumbered by the finalize after a removal: a name removed
    # once may now name someone else, so it is refused rather than removed again.
    earlier = [r["id"] for r in records if r["request"] == {"identity": identity}]
    if earlier:
        raise ValueError(
            f"identity {identity!r} was removed already ({', '.join(earlier)}); cluster names "
            "are renumbered after a removal: name further samples by source or sha256"
        )
    with storage.open_input(storage.join(out, "identities.parquet")) as handle:
        table = pq.read_table(handle, columns=["key", "identity"])
    keys = set(table.filter(pc.equal(table["identity"], identity))["key"].to_pylist())
    if not keys:
        raise ValueError(f"unknown identity {identity!r} in {out}")
    return [s for s in _index_samples(out) if s["key"] in keys]


def _by_sources(out: str, sources: list[str], records: list[dict]) -> tuple[list, list]:
    """(done records that removed some of these entries, samples still to remove)."""
    wanted = {}  # sample key or content hash -> the entry it came from
    for entry in sources:
        match = _SHA256.fullmatch(entry.strip().lower())
        wanted[match.group(1) if match else sample_key(os.path.abspath(entry.strip()))] = entry
    built = _index_samples(out)
    # Inputs of shards not built yet are only in the plan (no hash): taking them out suffices.
    with storage.open_input(storage.join(out, PLAN_FILE)) as handle:
        planned = pq.read_table(handle, columns=["key", "shard"]).to_pylist()
    in_index = {s["key"] for s in built}
    rows = built + [{**r, "sha256": None} for r in planned if r["key"] not in in_index]
    found = [s for s in rows if s["key"] in wanted or s["sha256"] in wanted]
    again = [r for r in records if r["status"] == DONE and wanted.keys() & _values(r)]
    matched = set().union(*(_values(r) for r in [{"samples": found}, *again]))
    unknown = sorted(entry for value, entry in wanted.items() if value not in matched)
    if unknown:
        raise ValueError(f"no sample in {out} matches: {', '.join(unknown)}")
    return again, found


def _values(record: dict) -> set[str]:
    return {v for s in record["samples"] for v in (s["key"], s["sha256"]) if v}


def _index_samples(out: str) -> list[dict]:
    rows = []
    for url in storage.list_files(storage.join(out, "shards"), "[0-9]*.parquet"):
        with storage.open_input(url) as handle:
            rows += pq.read_table(handle, columns=["key", "shard", "sha256"]).to_pylist()
    return rows


def _apply(out: str, record: dict, config: BuildConfig) -> dict:
    url = storage.join(out, REMOVALS_DIR, f"{record['id']}.json")
    _write_json(url, record)
    keys = {s["key"] for s in record["samples"]}
    storage.remove_stale_tmp(storage.join(out, "shards"))
    storage.remove_stale_tmp(out)
    done = {"rewritten": [], "deleted": []}
    names = storage.list_files(storage.join(out, "shards"), "[0-9]*.*")
    for shard_id in sorted({int(storage.name(n).split(".")[0]) for n in names}):
        action = _clean_shard(out, shard_id, keys)
        if action:
            done[action].append(shard_id)
    _purge_journals(out, keys)
    with storage.open_input(storage.join(out, PLAN_FILE)) as handle:
        plan = pq.read_table(handle)
    hit = _hits(plan, keys)
    if pc.any(hit).as_py():
        write_plan(out, plans_from_table(plan.filter(pc.invert(hit))))
    write_card(out, finalize(out, config))  # the card's counts and plots must not go stale
    record.update(status=DONE, completed=datetime.now(UTC).isoformat(timespec="seconds"))
    _write_json(url, record)
    return done


def _clean_shard(out: str, shard_id: int, keys: set[str]) -> str | None:
    """Drop `keys` from one shard: tar, then index, then stats (an emptied shard is deleted)."""
    paths = shard_paths(out, shard_id)
    if not storage.exists(paths["stats"]):
        # Not done (a build stopped before its stats, or an emptied shard half deleted: stats go
        # first): the next build redoes it from the plan, so its leftovers can go.
        storage.remove(paths["tar"])
        storage.remove(paths["index"])
        return None
    with storage.open_input(paths["index"]) as handle:
        index = pq.read_table(handle, schema=INDEX_SCHEMA)
    hit = _hits(index, keys)
    stats = json.loads(storage.read_text(paths["stats"]))
    if not pc.any(hit).as_py() and stats["inputs"] == index.num_rows:
        return None
    if pc.all(hit).as_py():
        for part in ("stats", "tar", "index"):
            storage.remove(paths[part])
        return "deleted"
    # Also when a run stopped between index and stats: the tar then comes out the same again.
    tar_bytes = _rewrite_tar(paths["tar"], keys)
    if pc.any(hit).as_py():
        index = index.filter(pc.invert(hit))
        with storage.atomic_open(paths["index"]) as handle:
            pq.write_table(index, handle, compression="zstd")
    rows = index.select(["status", "reason"]).to_pylist()
    reasons = dict(sorted(Counter(reason_code(r["reason"]) for r in rows if r["reason"]).items()))
    ok = sum(r["status"] == STATUS_OK for r in rows)
    stats["removed"] = stats.get("removed", 0) + stats["inputs"] - len(rows)
    stats.update(inputs=len(rows), ok=ok, rejected=len(rows) - ok, reasons=reasons)
    _write_json(paths["stats"], {**stats, "tar_bytes": tar_bytes})
    return "rewritten"


def _purge_journals(out: str, keys: set[str]) -> None:
    """Drop `keys` from the caption journals of unfinished shards and caption runs."""
    from fgid.caption_run import CAPTIONS_DIR  # caption_run imports this module

    journals = storage.list_files(storage.join(out, "shards"), f"[0-9]*{JOURNAL_SUFFIX}")
    for url in journals + storage.list_files(storage.join(out, CAPTIONS_DIR), "*.jsonl"):
        purge(url, keys)


def _hits(table: pa.Table, keys: set[str]) -> pa.ChunkedArray:
    return pc.is_in(table["key"], pa.array(sorted(keys), pa.string()))


def _write_json(url: str, data: dict) -> None:
    storage.atomic_write_text(url, json.dumps(data, indent=2, sort_keys=True))


def _rewrite_tar(url: str, keys: set[str]) -> int:
    """Copy every member not of `keys` with the writer's fixed headers; returns the data bytes."""
    kept = 0
    with rewrite_tar(url) as (old, new):
        for member in old:
            if member.name.split(".", 1)[0] in keys:
                continue
            data = old.extractfile(member).read()
            add_member(new, member.name, data)
            kept += len(data)
    return kept
