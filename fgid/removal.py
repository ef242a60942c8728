"""Take samples down from a built dataset: every shard, index and the plan, with a record.

Rows are deleted, not tombstoned (a source path can name a person); `removals/<id>.json` keeps
only keys, shards and content sha256s: proof of the removal, and what keeps a rebuild from adding
them back. It is written "pending" first and "done" last, every file is replaced atomically, so
an interrupted removal leaves whole files and the next removal completes it. Sources are paths or
content sha256s (a requester's copy of a photo). Caption journals a crashed build or caption run
left behind lose the removed samples' captions too. It holds the dataset's lock, so it refuses
to start while a build, caption run or another removal writes the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

import storage
from fgid import planfile
from fgid.captioning.journal import purge
from fgid.card import write_card
from fgid.config import BuildConfig
from fgid.dataset import REMOVAL_DONE, Dataset, write_json
from fgid.dataset import RemovalPending as RemovalPending  # where callers catch it
from fgid.finalize import finalize
from fgid.inputs import sample_key
from fgid.schema import STATUS_OK, reason_code
from fgid.shardtar import add_sample, rewrite_tar

PENDING, DONE = "pending", REMOVAL_DONE
_SHA256 = re.compile(r"(?:sha256:)?([0-9a-f]{64})")


def removal_records(out_dir: str) -> list[dict]:
    """Every removal record of a dataset, oldest first."""
    return Dataset(out_dir).removal_records()


def recorded_config(out_dir: str) -> BuildConfig:
    """The configuration the dataset was built with (finalize needs its grouping settings)."""
    return Dataset(out_dir).config()


def remove_samples(
    out_dir: str,
    *,
    identity: str | None = None,
    sources: list[str] | None = None,
    reason: str,
    config: BuildConfig | None = None,
) -> dict:
    """Remove one identity or a list of sources everywhere; returns the finished record."""
    if (identity is None) == (sources is None):
        raise ValueError("give exactly one of identity or sources")
    if not reason.strip():
        raise ValueError("a reason is required (a ticket number, not a name)")
    dataset = Dataset.open(out_dir)
    with dataset.lock("fgid remove"):
        return _remove(dataset, identity, sources, reason, config or dataset.config())


def _remove(
    dataset: Dataset, identity: str | None, sources: list[str] | None, reason: str, config
) -> dict:
    out = dataset.root
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
    # A cluster is named after its first member's key (fgid.finalize), so the name is stable;
    # but after a removal its remaining members may cluster under a new first key, and a second
    # request by the old name would match nothing or only what was left: it is refused, and
    # further samples are named by source or sha256.
    earlier = [r["id"] for r in records if r["request"] == {"identity": identity}]
    if earlier:
        raise ValueError(
            f"identity {identity!r} was removed already ({', '.join(earlier)}); name further "
            "samples of that person by source or sha256"
        )
    table = Dataset(out).identities(["key", "identity"])
    keys = table.filter(pc.equal(table["identity"], identity))["key"]
    if not len(keys):
        raise ValueError(f"unknown identity {identity!r} in {out}")
    built = _index_samples(out)
    return built.filter(pc.is_in(built["key"], keys.combine_chunks())).to_pylist()


def _by_sources(out: str, sources: list[str], records: list[dict]) -> tuple[list, list]:
    """(done records that removed some of these entries, samples still to remove)."""
    wanted = {}  # sample key or content hash -> the entry it came from
    for entry in sources:
        match = _SHA256.fullmatch(entry.strip().lower())
        wanted[match.group(1) if match else sample_key(_source(entry.strip()))] = entry
    # Columns, not rows: only the matching samples become Python objects (at ten million
    # samples, the rows would take gigabytes).
    values = pa.array(list(wanted), pa.string())
    built = _index_samples(out)
    hit = pc.or_kleene(pc.is_in(built["key"], values), pc.is_in(built["sha256"], values))
    found = built.filter(hit).to_pylist()
    # Inputs of shards not built yet are only in the plan (no hash): taking them out suffices.
    planned = Dataset(out).plan_table(["key", "shard"])
    planned = planned.filter(pc.is_in(planned["key"], values))
    in_index = pc.is_in(planned["key"], built["key"].combine_chunks())
    found += [{**r, "sha256": None} for r in planned.filter(pc.invert(in_index)).to_pylist()]
    again = [r for r in records if r["status"] == DONE and wanted.keys() & _values(r)]
    matched = set().union(*(_values(r) for r in [{"samples": found}, *again]))
    unknown = sorted(entry for value, entry in wanted.items() if value not in matched)
    if unknown:
        raise ValueError(f"no sample in {out} matches: {', '.join(unknown)}")
    return again, found


def _source(entry: str) -> str:
    """A source as the plan spells it (fgid.inputs): URLs as given, local paths absolute."""
    return entry if storage.is_remote(entry) else os.path.abspath(entry)


def _values(record: dict) -> set[str]:
    return {v for s in record["samples"] for v in (s["key"], s["sha256"]) if v}


def _index_samples(out: str) -> pa.Table:
    return Dataset(out).index(["key", "shard", "sha256"])


def _apply(out: str, record: dict, config: BuildConfig) -> dict:
    dataset = Dataset(out)
    url = dataset.removal_url(record["id"])
    _write_json(url, record)
    keys = {s["key"] for s in record["samples"]}
    dataset.prepare()
    done = {"rewritten": [], "deleted": []}
    for shard_id in dataset.shards_on_disk():
        action = _clean_shard(dataset, shard_id, keys)
        if action:
            done[action].append(shard_id)
    for journal in dataset.journals():
        purge(journal, keys)
    planfile.drop_keys(out, keys)
    write_card(out, finalize(out, config))  # the card's counts and plots must not go stale
    record.update(status=DONE, completed=datetime.now(UTC).isoformat(timespec="seconds"))
    _write_json(url, record)
    return done


def _clean_shard(dataset: Dataset, shard_id: int, keys: set[str]) -> str | None:
    """Drop `keys` from one shard: tar, then index, then stats (an emptied shard is deleted)."""
    files = dataset.shard(shard_id)
    if not dataset.shard_done(shard_id):
        # Not done (a build stopped before its stats, or an emptied shard half deleted: stats go
        # first): the next build redoes it from the plan, so its leftovers can go.
        storage.remove(files.tar)
        storage.remove(files.index)
        return None
    index = dataset.read_index(shard_id)
    hit = _hits(index, keys)
    stats = dataset.read_stats(shard_id)
    if not pc.any(hit).as_py() and stats["inputs"] == index.num_rows:
        return None
    if pc.all(hit).as_py():
        for part in (files.stats, files.tar, files.index):
            storage.remove(part)
        return "deleted"
    # Also when a run stopped between index and stats: the tar then comes out the same again.
    tar_bytes = _rewrite_tar(files.tar, keys)
    if pc.any(hit).as_py():
        index = index.filter(pc.invert(hit))
        dataset.write_index(shard_id, index)
    rows = index.select(["status", "reason"]).to_pylist()
    reasons = dict(sorted(Counter(reason_code(r["reason"]) for r in rows if r["reason"]).items()))
    ok = sum(r["status"] == STATUS_OK for r in rows)
    stats["removed"] = stats.get("removed", 0) + stats["inputs"] - len(rows)
    stats.update(inputs=len(rows), ok=ok, rejected=len(rows) - ok, reasons=reasons)
    dataset.write_stats(shard_id, {**stats, "tar_bytes": tar_bytes})
    return "rewritten"


def _hits(table: pa.Table, keys: set[str]) -> pa.ChunkedArray:
    return pc.is_in(table["key"], pa.array(sorted(keys), pa.string()))


def _write_json(url: str, data: dict) -> None:
    write_json(url, data)


def _rewrite_tar(url: str, keys: set[str]) -> int:
    """Copy every sample not of `keys` with the writer's fixed headers (members a reader must
    skip, such as links or oversized members, are dropped); returns the data bytes."""
    kept = 0
    with rewrite_tar(url) as (samples, new):
        for key, members in samples:
            if key not in keys:
                kept += add_sample(new, key, members)
    return kept
