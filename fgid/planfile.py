"""plan.parquet, every planned input's shard and fields: written, read and compared in bounded
memory.

Rows are written in plan order, a row group at a time, each group whole shards of about
PLAN_ROW_GROUP inputs, so one shard is read back by the group(s) holding it (`shard_plan`) and
the recorded plan is never needed whole: a build keeps only its outline (a PlannedShard per
shard). A rerun and an append compare a fresh listing with the recorded plan by source, both
sorted in bounded memory (fgid.sorting).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import storage
from fgid import sorting
from fgid.inputs import PLAN_FILE, PLAN_SCHEMA, InputItem, PlannedShard, ShardPlan

ITEM_COLUMNS = ("key", "source", "label", "caption", "license", "source_url", "extra")
# Rows per row group of plan.parquet: written and read a group at a time.
PLAN_ROW_GROUP = 65_536
# A plan row as the comparison sorts it: source first, then the item's other fields.
_BY_SOURCE = pa.schema([PLAN_SCHEMA.field("source"), PLAN_SCHEMA.field("key"),
                        *(PLAN_SCHEMA.field(c) for c in ITEM_COLUMNS[2:])])  # fmt: skip


def _fields(item: InputItem) -> tuple:
    return (item.key, item.source, item.label, item.caption, item.license, item.source_url,
            item.extra)  # fmt: skip


class PlanWriter:
    """Plan rows written a row group of whole shards at a time, as a context manager (the file
    is complete when the block ends without an error); then `outline()` is what it wrote."""

    def __init__(self, handle) -> None:
        self.writer = pq.ParquetWriter(handle, PLAN_SCHEMA)
        self.rows: list[tuple] = []
        self.sizes: dict[int, int] = {}
        self.written = False

    def add(self, shard_id: int, item: InputItem) -> None:
        if len(self.rows) >= PLAN_ROW_GROUP and self.rows[-1][0] != shard_id:
            self._flush()
        self.rows.append((shard_id, *_fields(item)))
        self.sizes[shard_id] = self.sizes.get(shard_id, 0) + 1

    def add_table(self, table: pa.Table) -> None:
        """Rows already in the plan's form (a recorded plan's row group), copied as they are."""
        self._flush()
        self.writer.write_table(_with_plan_schema(table))
        self.written = True
        _count_shards(self.sizes, table)

    def _flush(self) -> None:
        if not self.rows:
            return
        self.writer.write_table(_rows_table(self.rows))
        self.rows, self.written = [], True

    def __enter__(self) -> PlanWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self._flush()
            if not self.written:
                self.writer.write_table(PLAN_SCHEMA.empty_table())
            self.writer.close()
            return
        # The file is thrown away (storage.atomic_open); the error that stopped the writing
        # is the one raised, not one from closing after it.
        with contextlib.suppress(Exception):
            self.writer.close()

    def outline(self) -> list[PlannedShard]:
        return [PlannedShard(s, n) for s, n in self.sizes.items()]


def _count_shards(sizes: dict[int, int], table: pa.Table) -> None:
    """Add the rows of each shard in `table` (plan rows, a shard's rows next to each other) to
    `sizes`, keeping first-seen order."""
    shards = table["shard"].to_numpy()
    if not len(shards):
        return
    starts = np.r_[0, np.flatnonzero(np.diff(shards)) + 1]
    lengths = np.diff(np.r_[starts, len(shards)])
    for shard, size in zip(shards[starts].tolist(), lengths.tolist(), strict=True):
        sizes[shard] = sizes.get(shard, 0) + size


def _rows_table(rows: list[tuple]) -> pa.Table:
    """Plan rows (shard first, then the item's fields) as a table of the plan's schema."""
    columns = zip(*rows, strict=True) if rows else [[]] * len(PLAN_SCHEMA)
    arrays = [pa.array(list(c), f.type) for c, f in zip(columns, PLAN_SCHEMA, strict=True)]
    return pa.Table.from_arrays(arrays, schema=PLAN_SCHEMA)


def write_listing(
    url: str,
    items: Iterable[InputItem],
    shard_size: int,
    removed: frozenset[str] | set[str] = frozenset(),
    first: int = 0,
) -> list[PlannedShard]:
    """`items` in shards of `shard_size` numbered from `first`, written to `url` (atomically);
    removed keys are left out after numbering (their shards keep their numbers)."""
    with storage.atomic_open(url) as handle, PlanWriter(handle) as writer:
        for i, item in enumerate(items):
            if item.key not in removed:
                writer.add(first + i // shard_size, item)
    return writer.outline()


def write_plan(out_dir: str, plans: list[ShardPlan]) -> None:
    with storage.atomic_open(storage.join(out_dir, PLAN_FILE)) as handle, PlanWriter(handle) as w:
        for plan in plans:
            for item in plan.items:
                w.add(plan.shard_id, item)


def copy_plan(source: str, out_dir: str, after_recorded: bool = False) -> None:
    """The plan file at `source` (a listing) as `out_dir`'s plan, a row group at a time; with
    `after_recorded`, after the recorded plan's rows, which are copied unchanged (a plan written
    before a column existed gains it as nulls)."""
    url = storage.join(out_dir, PLAN_FILE)
    parts = [url, source] if after_recorded else [source]
    with storage.atomic_open(url) as handle, PlanWriter(handle) as writer:
        for part in parts:
            for table in _row_groups(part):
                writer.add_table(table)


def drop_keys(out_dir: str, keys: set[str]) -> bool:
    """Rewrite `out_dir`'s plan without the inputs of `keys` (a row group at a time); False,
    and nothing written, when the plan holds none of them."""
    url = storage.join(out_dir, PLAN_FILE)
    wanted = pa.array(sorted(keys), pa.string())
    if not any(pc.any(pc.is_in(t["key"], wanted)).as_py() for t in _row_groups(url, ["key"])):
        return False
    with storage.atomic_open(url) as handle, PlanWriter(handle) as writer:
        for table in _row_groups(url):
            writer.add_table(table.filter(pc.invert(pc.is_in(table["key"], wanted))))
    return True


def _row_groups(url: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    with storage.open_for_arrow(url) as handle:
        plan = pq.ParquetFile(handle)
        names = [c for c in columns or plan.schema_arrow.names if c in plan.schema_arrow.names]
        for group in range(plan.num_row_groups):
            yield plan.read_row_group(group, columns=names, use_threads=False)


def _with_plan_schema(table: pa.Table) -> pa.Table:
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in PLAN_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=PLAN_SCHEMA)


def outline(url: str) -> list[PlannedShard]:
    """The shards of the plan at `url` with their sizes, in plan order, from its shard column."""
    sizes: dict[int, int] = {}
    for table in _row_groups(url, ["shard"]):
        _count_shards(sizes, table)
    return [PlannedShard(s, n) for s, n in sizes.items()]


def shard_plan(url: str, shard_id: int) -> ShardPlan:
    """One shard's inputs, reading only the row groups whose shard range holds it."""
    items: list[InputItem] = []
    with storage.open_for_arrow(url) as handle:
        plan = pq.ParquetFile(handle)
        column = plan.schema_arrow.get_field_index("shard")
        for group in range(plan.num_row_groups):
            stats = plan.metadata.row_group(group).column(column).statistics
            if stats is not None and stats.has_min_max and not stats.min <= shard_id <= stats.max:
                continue
            table = _with_plan_schema(plan.read_row_group(group, use_threads=False))
            rows = table.filter(pc.equal(table["shard"], shard_id))
            items.extend(_items(rows))
    return ShardPlan(shard_id, tuple(items))


def _items(table: pa.Table) -> Iterator[InputItem]:
    columns = [table[c].to_pylist() for c in ITEM_COLUMNS]
    return (InputItem(*fields) for fields in zip(*columns, strict=True))


def read_plan(url: str) -> list[ShardPlan]:
    """The whole plan in memory: for small plans and tests (a build reads `outline`)."""
    return _grouped(_with_plan_schema(t) for t in _row_groups(url))


def plan_table(plans: list[ShardPlan]) -> pa.Table:
    """Small plans as one table (tests and tools; a build writes through PlanWriter)."""
    return _rows_table([(p.shard_id, *_fields(item)) for p in plans for item in p.items])


def plans_from_table(table: pa.Table) -> list[ShardPlan]:
    return _grouped([_with_plan_schema(table)])


def _grouped(tables: Iterable[pa.Table]) -> list[ShardPlan]:
    grouped: dict[int, list[InputItem]] = {}
    for table in tables:
        for shard, item in zip(table["shard"].to_pylist(), _items(table), strict=True):
            grouped.setdefault(shard, []).append(item)
    return [ShardPlan(shard, tuple(items)) for shard, items in sorted(grouped.items())]


@dataclass
class PlanDiff:
    """A fresh listing against the recorded plan, by source: inputs only in the listing
    (`added`), only in the plan (`missing`), in both with other fields (`changed`)."""

    added: int = 0
    missing: int = 0
    changed: int = 0

    @property
    def same(self) -> bool:
        return not (self.added or self.missing or self.changed)

    def describe(self) -> str:
        """'3 inputs added, 1 missing since the first run', or what changed."""
        parts = [f"{self.added} input{'s' * (self.added != 1)} added"] if self.added else []
        parts += [f"{self.missing} missing"] if self.missing else []
        if parts:
            return ", ".join(parts) + " since the first run"
        n = self.changed
        return f"{n} input{'s' * (n != 1)} with other labels or fields than at first"


def diff_plans(recorded: str, listing: str, new: PlanWriter | None = None, *,
               shard_size: int = 1, first: int = 0) -> PlanDiff:  # fmt: skip
    """Compare the listing at `listing` (in source order, as write_listing wrote it) with the
    recorded plan at `recorded` (any order). With `new`, the added inputs are written to it in
    source order, in shards of `shard_size` numbered from `first`."""
    diff = PlanDiff()
    ahead = sorting.sorted_rows(_plan_rows(recorded), _BY_SOURCE)
    fresh = _plan_rows(listing)
    old, now = next(ahead, None), next(fresh, None)
    while old is not None or now is not None:
        if now is None or (old is not None and old[0] < now[0]):
            diff.missing += 1
            old = next(ahead, None)
        elif old is None or now[0] < old[0]:
            if new is not None:
                new.add(first + diff.added // shard_size, InputItem(now[1], now[0], *now[2:]))
            diff.added += 1
            now = next(fresh, None)
        else:
            diff.changed += old != now
            old, now = next(ahead, None), next(fresh, None)
    return diff


def _plan_rows(url: str) -> Iterator[tuple]:
    """(source, key, label, caption, license, source_url, extra) per row, a group at a time."""
    names = ["source", "key", *ITEM_COLUMNS[2:]]
    for table in _row_groups(url):
        table = _with_plan_schema(table)
        yield from zip(*(table[c].to_pylist() for c in names), strict=True)
