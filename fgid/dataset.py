"""A built dataset on disk (local folder or s3:// prefix): its layout, plan, shards and owner.

Every module that reads or writes a build asks a `Dataset` where things are and what state they
are in; none spells a file name of the layout itself:

    build.json                     configuration and format version, written when planned
    plan.parquet                   every input's shard and key (fgid.inputs)
    shards/NNNNN.tar|.parquet      one shard's samples and index rows
    shards/NNNNN.stats.json        written last: the shard is done when it exists
    shards/NNNNN.caption-journal.jsonl   captions of an unfinished shard (fgid.stages.caption)
    identities.parquet, summary.json     written by fgid.finalize
    removals/<id>.json             takedown records (fgid.removal)
    builds/NNNN.json               one record per build or append of new inputs (fgid.history)
    captions/<id>.json, <id>.NNNNN.jsonl caption runs and their journals (fgid.captioning.run)
    .fgid-lock.json                the process writing the folder (storage.lock)

Shard files are read as untrusted (fgid.shardtar), and so are keys from identities.parquet.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import storage
from fgid import planfile
from fgid.errors import FailureError, UsageError
from fgid.inputs import PLAN_FILE, PlannedShard, ShardPlan, suggestion
from fgid.schema import IDENTITY_SCHEMA, INDEX_SCHEMA, STATUS_OK, shard_name
from fgid.shardtar import OnSkip, UnsafeSample, is_key, open_samples
from storage.lock import OutputHeld, OutputLock, describe, holder

BUILD_FILE = "build.json"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "build-status.json"  # fgid.status: the running build's progress
IDENTITIES_FILE = "identities.parquet"
SHARDS_DIR = "shards"
REMOVALS_DIR = "removals"
HISTORY_DIR = "builds"
CAPTIONS_DIR = "captions"
STATS_SUFFIX = ".stats.json"
JOURNAL_SUFFIX = ".caption-journal.jsonl"
REMOVAL_DONE = "done"


class NotADataset(UsageError):
    """The folder is not an fgid build (or not a finished one, where that is needed)."""


class DatasetInUse(OutputHeld, FailureError):
    """Another live process writes the dataset (a build, caption run, removal or export)."""


class RemovalPending(RuntimeError):
    """A removal was interrupted; it must be completed before the output is built on."""


@dataclass(frozen=True)
class ShardFiles:
    tar: str
    index: str
    stats: str
    # Not a temporary name (those are deleted before a shard is redone): it must outlive one.
    journal: str


def shard_of(url: str) -> int:
    """shards/00012.tar (or .parquet, .stats.json) -> 12."""
    return int(storage.name(url).split(".", 1)[0])


def _json(url: str) -> dict:
    return json.loads(storage.read_text(url))


def write_json(url: str, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
    storage.atomic_write_text(url, text)


class Dataset:
    """The build under `root`. `Dataset.open` checks it is one; the constructor does not (a
    build about to be planned is a Dataset too)."""

    def __init__(self, root: str) -> None:
        self.root = str(root)

    @classmethod
    def open(cls, root: str, *, finished: bool = False) -> Dataset:
        """The dataset at `root`, or NotADataset naming what is missing."""
        dataset = cls(root)
        if not storage.is_remote(str(root)) and not Path(root).exists():
            raise NotADataset(f"no such folder: {root}{suggestion(Path(root))}")
        needed = [BUILD_FILE, PLAN_FILE] + ([SUMMARY_FILE, IDENTITIES_FILE] if finished else [])
        for name in needed:
            if not storage.exists(dataset.path(name)):
                kind = "a finished fgid build" if finished else "an fgid build"
                raise NotADataset(f"{root} is not {kind}: it has no {name}")
        return dataset

    def __repr__(self) -> str:
        return f"Dataset({self.root!r})"

    # Layout.

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def shards_dir(self) -> str:
        return self.path(SHARDS_DIR)

    def shard(self, shard_id: int) -> ShardFiles:
        base = storage.join(self.shards_dir, shard_name(shard_id))
        return ShardFiles(
            f"{base}.tar", f"{base}.parquet", f"{base}{STATS_SUFFIX}", f"{base}{JOURNAL_SUFFIX}"
        )

    def prepare(self) -> None:
        """Create the folders and delete temporaries that dead writers left."""
        storage.makedirs(self.shards_dir)
        storage.remove_stale_tmp(self.shards_dir)
        storage.remove_stale_tmp(self.root)

    # Ownership.

    def lock(self, command: str) -> OutputLock:
        """`with dataset.lock("fgid build"):` the one process writing this dataset."""
        storage.makedirs(self.root)
        return OutputLock(self.root, command, error=DatasetInUse)

    def check_free(self) -> None:
        """DatasetInUse when another live process holds the dataset."""
        in_use = self.holder()
        if in_use is not None:
            raise DatasetInUse(f"{self.root} is in use by {in_use}; wait for it or stop it")

    def holder(self) -> str | None:
        """Who else holds the dataset now (a one-line description), or None."""
        owner = holder(self.root)
        return None if owner is None else describe(owner)

    # Build record and plan.

    def build_info(self) -> dict | None:
        url = self.path(BUILD_FILE)
        return _json(url) if storage.exists(url) else None

    def write_build_info(self, info: dict) -> None:
        write_json(self.path(BUILD_FILE), info)

    def config(self):
        """The BuildConfig the dataset was built with."""
        from fgid.config import BuildConfig

        info = self.build_info()
        if info is None:
            raise NotADataset(f"{self.root} is not an fgid build: it has no {BUILD_FILE}")
        return BuildConfig.model_validate(info["config"])

    def plan_table(self, columns: list[str] | None = None) -> pa.Table:
        with storage.open_for_arrow(self.path(PLAN_FILE)) as handle:
            return pq.read_table(handle, columns=columns)

    def read_plan(self) -> list[ShardPlan]:
        """The whole plan in memory (small plans, tests); a build reads `outline`."""
        return planfile.read_plan(self.path(PLAN_FILE))

    def outline(self) -> list[PlannedShard]:
        """The recorded plan's shards and their sizes, without their inputs."""
        return planfile.outline(self.path(PLAN_FILE))

    def shard_plan(self, shard_id: int) -> ShardPlan:
        """One shard's inputs, read from the plan's row groups that hold it."""
        return planfile.shard_plan(self.path(PLAN_FILE), shard_id)

    def write_plan(self, plans: list[ShardPlan]) -> None:
        planfile.write_plan(self.root, plans)

    # Build history.

    def history_url(self, number: int) -> str:
        return self.path(HISTORY_DIR, f"{number:04d}.json")

    def history(self) -> list[dict]:
        """Every build record (fgid.history), oldest first."""
        return [_json(u) for u in storage.list_files(self.path(HISTORY_DIR), "[0-9]*.json")]

    # Shards.

    def done_shards(self) -> list[int]:
        """Shards whose build is committed (their stats exist), in order."""
        return [shard_of(u) for u in storage.list_files(self.shards_dir, f"[0-9]*{STATS_SUFFIX}")]

    def shard_done(self, shard_id: int) -> bool:
        return storage.exists(self.shard(shard_id).stats)

    def shards_on_disk(self) -> list[int]:
        """Every shard with any file (done or not), in order."""
        names = storage.list_files(self.shards_dir, "[0-9]*.*")
        return sorted({shard_of(n) for n in names})

    def done_tars(self) -> list[str]:
        """The tar of every done shard, in shard order: what readers may read."""
        return [self.shard(s).tar for s in self.done_shards()]

    def read_stats(self, shard_id: int) -> dict:
        return _json(self.shard(shard_id).stats)

    def write_stats(self, shard_id: int, stats: dict) -> None:
        """Commit a shard's stats: the last write of any change to a shard."""
        storage.atomic_write_text(
            self.shard(shard_id).stats, json.dumps(stats, indent=2, sort_keys=True)
        )

    def all_stats(self) -> dict[int, dict]:
        return {s: self.read_stats(s) for s in self.done_shards()}

    def read_index(self, shard_id: int, columns: list[str] | None = None) -> pa.Table:
        with storage.open_for_arrow(self.shard(shard_id).index) as handle:
            # The schema also reads indexes written before a column existed: it comes as nulls.
            return pq.read_table(handle, columns=columns, schema=INDEX_SCHEMA)

    def write_index(self, shard_id: int, table: pa.Table) -> None:
        with storage.atomic_open(self.shard(shard_id).index) as handle:
            pq.write_table(table, handle, compression="zstd")

    def index(self, columns: list[str] | None = None) -> pa.Table:
        """Every shard index on disk, in shard order."""
        files = storage.list_files(self.shards_dir, "[0-9]*.parquet")
        if not files:
            schema = (
                INDEX_SCHEMA
                if columns is None
                else pa.schema([INDEX_SCHEMA.field(c) for c in columns])
            )
            return schema.empty_table()
        return pa.concat_tables(self.read_index(shard_of(u), columns) for u in files)

    def kept_samples(self, shard_id: int) -> int:
        status = self.read_index(shard_id, ["status"])["status"]
        return int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0)

    def samples(
        self, shard_id: int, on_skip: OnSkip | None = None
    ) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {ext: bytes}) per sample of a done shard, in tar order, streamed and checked."""
        if not self.shard_done(shard_id):
            raise ValueError(f"shard {shard_name(shard_id)} of {self.root} is not finished")
        with open_samples(self.shard(shard_id).tar, on_skip=on_skip) as found:
            yield from found

    def first_samples(self, count: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Up to `count` samples from the first done shards (what `fgid inspect` shows)."""
        for shard_id in self.done_shards():
            for sample in self.samples(shard_id):
                if count <= 0:
                    return
                count -= 1
                yield sample

    # Finalize's files.

    def identities(self, columns: list[str] | None = None) -> pa.Table:
        """identities.parquet; a row whose key is not of our form is a hostile file: refused."""
        url = self.path(IDENTITIES_FILE)
        if not storage.exists(url):
            raise NotADataset(f"{self.root} has no {IDENTITIES_FILE}: not a finished fgid build")
        with storage.open_for_arrow(url) as handle:
            table = pq.read_table(handle, columns=columns)
        for field in ("key", "duplicate_of", "near_duplicate_of"):
            if field in table.column_names:
                bad = [k for k in table[field].to_pylist() if k is not None and not is_key(k)]
                if bad:
                    raise UnsafeSample("bad_key", f"{IDENTITIES_FILE} {field} {bad[0][:80]!r}")
        return table

    def write_identities(self, identities: pa.Table | list[dict]) -> None:
        if not isinstance(identities, pa.Table):
            identities = pa.Table.from_pylist(identities, schema=IDENTITY_SCHEMA)
        with storage.atomic_open(self.path(IDENTITIES_FILE)) as handle:
            pq.write_table(identities.cast(IDENTITY_SCHEMA), handle)

    def summary(self) -> dict:
        url = self.path(SUMMARY_FILE)
        if not storage.exists(url):
            raise NotADataset(f"{self.root} has no {SUMMARY_FILE}: not a finished fgid build")
        return _json(url)

    def write_summary(self, summary: dict) -> None:
        storage.atomic_write_text(
            self.path(SUMMARY_FILE), json.dumps(summary, indent=2, sort_keys=True)
        )

    # Removals.

    def removal_url(self, record_id: str) -> str:
        return self.path(REMOVALS_DIR, f"{record_id}.json")

    def removal_records(self) -> list[dict]:
        """Every removal record, oldest first."""
        return [_json(u) for u in storage.list_files(self.path(REMOVALS_DIR), "*.json")]

    def check_no_pending_removal(self) -> None:
        pending = [r["id"] for r in self.removal_records() if r["status"] != REMOVAL_DONE]
        if pending:
            raise RemovalPending(
                f"{self.root} has an unfinished removal ({', '.join(pending)}); run the same "
                "`fgid remove` again to complete it"
            )

    def removed_keys(self) -> set[str]:
        return {s["key"] for r in self.removal_records() for s in r["samples"]}

    def removed_for_planning(self) -> set[str]:
        """The keys a plan leaves out (taken down; a rerun neither rebuilds nor re-adds them);
        RemovalPending while a removal is unfinished."""
        self.check_no_pending_removal()
        return self.removed_keys()

    # Caption runs.

    def caption_record_url(self, run_id: str) -> str:
        return self.path(CAPTIONS_DIR, f"{run_id}.json")

    def caption_journal_url(self, run_id: str, shard_id: int) -> str:
        return self.path(CAPTIONS_DIR, f"{run_id}.{shard_name(shard_id)}.jsonl")

    def journals(self) -> list[str]:
        """Caption journals of unfinished shards and of caption runs."""
        shards = storage.list_files(self.shards_dir, f"[0-9]*{JOURNAL_SUFFIX}")
        return shards + storage.list_files(self.path(CAPTIONS_DIR), "*.jsonl")
