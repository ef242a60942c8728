"""Planning in bounded memory: the external sort and plan.parquet written, read and compared a
row group at a time. Small run and row-group sizes make the spilled paths run on small inputs."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fgid import planfile, sorting
from fgid.inputs import InputItem, PlannedShard, iter_items, sample_key
from fgid.planfile import PlanWriter, copy_plan, diff_plans, outline, shard_plan, write_listing

SCHEMA = pa.schema([("name", pa.string()), ("order", pa.int64())])


@pytest.mark.parametrize("run_rows", [1, 7, 1000])
def test_sorted_rows_is_a_stable_sort_spilled_or_not(run_rows):
    rng = random.Random(0)
    rows = [(rng.choice("abcdefg") * rng.randint(1, 3), i) for i in range(500)]
    got = list(sorting.sorted_rows(iter(rows), SCHEMA, run_rows=run_rows))
    assert got == sorted(rows, key=lambda r: r[0])  # Python's sort is stable: ties in order


def test_the_spilled_runs_are_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    rows = sorting.sorted_rows(((str(i % 10), i) for i in range(100)), SCHEMA, run_rows=8)
    assert next(rows) == ("0", 0)
    assert len(list(tmp_path.glob("fgid-sort-*/run-*.arrow"))) == 13
    assert len(list(rows)) == 99
    assert not list(tmp_path.iterdir())
    abandoned = sorting.sorted_rows(((str(i), i) for i in range(100)), SCHEMA, run_rows=8)
    next(abandoned)
    abandoned.close()
    assert not list(tmp_path.iterdir())


def test_listing_sorts_dedupes_and_keeps_the_first_given_past_one_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sorting, "RUN_ROWS", 5)
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [f"{i:03d}.jpg" for i in range(23)]
    for name in reversed(names):
        (folder / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"photos/{n}\n" for n in names[::3]) + "photos/zzz.jpg\n")
    items = list(iter_items([str(listing), str(folder)]))
    assert [i.source for i in items] == sorted(
        [str(folder / n) for n in names] + [str(folder / "zzz.jpg")]
    )
    assert [i.key for i in items] == [sample_key(i.source) for i in items]


def items(names: list[str], label: str | None = None) -> list[InputItem]:
    return [InputItem(sample_key(n), n, label) for n in names]


def test_row_groups_hold_whole_shards_and_one_shard_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(planfile, "PLAN_ROW_GROUP", 10)
    url = str(tmp_path / "plan.parquet")
    given = items([f"/in/{i:04d}.jpg" for i in range(95)])
    shards = write_listing(url, iter(given), shard_size=4, removed={given[5].key})
    assert shards[:2] == [PlannedShard(0, 4), PlannedShard(1, 3)]
    assert sum(s.size for s in shards) == 94 and len(shards) == 24
    assert outline(url) == shards
    groups = pq.ParquetFile(url).metadata
    for g in range(groups.num_row_groups):  # no shard is split between groups
        stats = groups.row_group(g).column(0).statistics
        later = [
            groups.row_group(h).column(0).statistics for h in range(g + 1, groups.num_row_groups)
        ]
        assert all(stats.max < s.min for s in later)
    assert groups.num_row_groups > 5
    assert shard_plan(url, 1).items == tuple(given[4:5] + given[6:8])
    assert shard_plan(url, 23).items == tuple(given[92:])
    assert shard_plan(url, 99).items == ()


def test_a_plan_written_before_columns_existed_reads_and_copies_with_nulls(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    given = items(["/a.jpg", "/b.jpg"], "7")
    pq.write_table(
        pa.table({"shard": pa.array([0, 0], pa.int32()), "key": [i.key for i in given],
                  "source": ["/a.jpg", "/b.jpg"], "label": ["7", "7"]}),
        old / "plan.parquet",
    )  # fmt: skip
    assert shard_plan(str(old / "plan.parquet"), 0).items == tuple(given)
    more = str(tmp_path / "more.parquet")
    write_listing(more, iter(items(["/c.jpg"])), 4, first=1)
    copy_plan(more, str(old), after_recorded=True)
    plan = pq.read_table(old / "plan.parquet")
    assert plan.column_names[-1] == "extra" and plan["source"].to_pylist()[-1] == "/c.jpg"
    assert outline(str(old / "plan.parquet")) == [PlannedShard(0, 2), PlannedShard(1, 1)]


@pytest.mark.parametrize("run_rows", [3, 1000])
def test_diff_by_source_counts_and_writes_the_added_in_source_order(
    tmp_path, monkeypatch, run_rows
):
    monkeypatch.setattr(sorting, "RUN_ROWS", run_rows)
    recorded = str(tmp_path / "recorded.parquet")
    # An appended plan is not sorted as a whole: the later shard holds earlier names.
    with open(recorded, "wb") as handle, PlanWriter(handle) as writer:
        for item in items(["/m", "/n", "/o", "/p", "/x"]):
            writer.add(0, item)
        for item in items(["/b", "/c"]):
            writer.add(1, item)
    now = items(["/a", "/b", "/c", "/d", "/m", "/n", "/p", "/x", "/y"])
    now[5] = InputItem(now[5].key, now[5].source, "relabelled")
    listing = str(tmp_path / "listing.parquet")
    write_listing(listing, iter(now), 100)
    added = str(tmp_path / "added.parquet")
    with open(added, "wb") as handle, PlanWriter(handle) as writer:
        diff = diff_plans(recorded, listing, writer, shard_size=2, first=5)
    assert (diff.added, diff.missing, diff.changed) == (3, 1, 1)
    assert diff.describe() == "3 inputs added, 1 missing since the first run"
    assert writer.outline() == [PlannedShard(5, 2), PlannedShard(6, 1)]
    assert [i.source for p in planfile.read_plan(added) for i in p.items] == ["/a", "/d", "/y"]
    assert diff_plans(listing, listing).same
    relabelled = planfile.PlanDiff(changed=1)
    assert relabelled.describe() == "1 input with other labels or fields than at first"
