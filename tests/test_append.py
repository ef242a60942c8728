"""Appending to a build: new inputs become new shards; old shards and identities stay as is."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fgid.dataset import Dataset
from fgid.history import history_lines
from fgid.pipeline import OutputMismatch, build

FIRST = ["astronaut.png", "coffee (no face).png", "notes.jpg", "tom_hanks.png"]
SECOND = ["astronaut copy.png", "astronaut flipped.jpg", "grace_hopper.jpg"]
THIRD = ["astronaut-brighter.jpg", "grace_hopper flipped.jpg", "group-t1.jpg"]


def shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def identities(out) -> dict[str, str]:
    table = pq.read_table(out / "identities.parquet")
    return dict(zip(table["key"].to_pylist(), table["identity"].to_pylist(), strict=True))


def index(out):
    return pq.read_table(sorted(str(p) for p in (out / "shards").glob("*.parquet")))


def add(folder, demo_inputs, names) -> None:
    for name in names:
        shutil.copy(demo_inputs / name, folder / name)


@pytest.fixture(scope="module")
def grown(tmp_path_factory, demo_inputs, lite_config, lite_models):
    """A build of FIRST, then two appends after SECOND and THIRD were added to its folder, with
    what each step left behind."""
    root = tmp_path_factory.mktemp("append")
    folder, out = root / "photos", root / "ds"
    folder.mkdir()
    labels = root / "labels.txt"
    labels.write_text("grace_hopper.jpg hopper\ngroup-t1.jpg t1\n")
    config = lite_config.with_overrides(labels=str(labels))
    steps = []
    for names in (FIRST, SECOND, THIRD):
        add(folder, demo_inputs, names)
        summary = build([str(folder)], str(out), config, lite_models, append=bool(steps))
        plan = pq.read_table(out / "plan.parquet")
        steps.append(
            {"summary": summary, "shards": shard_bytes(out), "ids": identities(out), "plan": plan}
        )
    return folder, out, config, steps


def test_appends_build_only_the_new_inputs(grown, lite_models):
    folder, out, _, steps = grown
    for before, after in zip(steps, steps[1:], strict=False):
        # Every file of an earlier shard is byte-for-byte what it was; new shards come after.
        assert {k: after["shards"][k] for k in before["shards"]} == before["shards"]
        old = {int(name[:5]) for name in before["shards"]}
        new = {int(name[:5]) for name in after["shards"]} - old
        assert new and min(new) > max(old)
        # The plan gained rows; the recorded ones are unchanged.
        assert after["plan"].slice(0, before["plan"].num_rows).equals(before["plan"])
        assert after["plan"].num_rows > before["plan"].num_rows
        # An old sample keeps its identity; a new one joins an old identity or starts one.
        assert {k: after["ids"][k] for k in before["ids"]} == before["ids"]
    table = index(out)
    sources = table["source"].to_pylist()
    assert sorted(sources) == sorted(str(folder / n) for n in FIRST + SECOND + THIRD)
    assert len(set(table["key"].to_pylist())) == len(sources)  # every input once
    final = steps[-1]["summary"]
    assert final["complete"] and final["inputs"]["indexed"] == len(sources)
    assert final == Dataset(str(out)).summary()


def test_new_faces_join_old_identities_and_labels_apply(grown):
    folder, out, _, steps = grown
    ids = identities(out)
    rows = pq.read_table(out / "identities.parquet")
    by_source = dict(
        zip(index(out)["key"].to_pylist(), index(out)["source"].to_pylist(), strict=True)
    )
    name_of = {by_source[k].rsplit("/", 1)[1]: i for k, i in ids.items()}
    # The astronaut of the first build; her copy, mirror and brighter photo appended later.
    astronaut = name_of["astronaut.png"]
    assert astronaut in steps[0]["ids"].values()
    for name in ("astronaut copy.png", "astronaut flipped.jpg", "astronaut-brighter.jpg"):
        assert name_of[name] == astronaut, name
    assert name_of["tom_hanks.png"] != astronaut
    # --labels applies to appended inputs too, in either append.
    assert (name_of["grace_hopper.jpg"], name_of["group-t1.jpg"]) == ("label-hopper", "label-t1")
    # An appended byte copy is a duplicate of the old sample.
    dup = dict(zip(rows["key"].to_pylist(), rows["duplicate_of"].to_pylist(), strict=True))
    key_of = {v.rsplit("/", 1)[1]: k for k, v in by_source.items()}
    assert dup[key_of["astronaut copy.png"]] == key_of["astronaut.png"]


def test_history_records_each_addition(grown):
    _, out, _, steps = grown
    records = Dataset(str(out)).history()
    assert [r["kind"] for r in records] == ["build", "append", "append"]
    assert [r["status"] for r in records] == ["done"] * 3
    assert [r["inputs_added"] for r in records] == [len(FIRST), len(SECOND), len(THIRD)]
    samples = [s["summary"]["samples"] for s in steps]
    assert [r["samples_added"] for r in records] == [
        samples[0],
        samples[1] - samples[0],
        samples[2] - samples[1],
    ]
    assert records[1]["first_shard"] == records[0]["last_shard"] + 1
    lines = history_lines(Dataset(str(out)))
    assert len(lines) == 3 and "append" in lines[2] and f"+{len(THIRD)} inputs" in lines[2]


def test_inspect_shows_the_history(grown):
    from flows.cli import app

    _, out, _, _ = grown
    result = CliRunner().invoke(app, ["inspect", str(out), "--samples", "0"])
    assert result.exit_code == 0, result.output
    assert "Builds" in result.output and result.output.count(" append ") == 2


def test_nothing_new_changes_nothing(grown, lite_models):
    folder, out, config, steps = grown
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    summary = build([str(folder)], str(out), config, lite_models, append=True)
    assert summary == steps[-1]["summary"]
    assert files == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # A plain rerun of the same inputs resumes the appended dataset as it is.
    assert build([str(folder)], str(out), config, lite_models) == summary
    assert shard_bytes(out) == steps[-1]["shards"]


def test_refusals_point_at_append(tmp_path, grown, demo_inputs, lite_models):
    folder, out, config, _ = grown
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    extra = tmp_path / "more.txt"
    extra.write_text(str(demo_inputs / "astronaut.png") + "\n")  # another path: another input
    with pytest.raises(OutputMismatch, match="1 input added") as error:
        build([str(folder), str(extra)], str(copy), config, lite_models)
    assert "--append" in str(error.value)
    with pytest.raises(OutputMismatch, match="another configuration"):
        build([str(folder)], str(copy), config.with_overrides(**{"align.size": 256}), append=True)


def test_disappeared_inputs_are_reported_and_kept(
    tmp_path, grown, demo_inputs, lite_models, caplog
):
    folder, out, config, steps = grown
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    # The copy's plan names the original folder; list its files, less two, plus one new.
    kept = sorted(folder.iterdir())[2:]
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in kept) + f"{demo_inputs / 'notes.jpg'}\n")
    with caplog.at_level("WARNING"):
        summary = build([str(listing)], str(copy), config, lite_models, append=True)
    assert "2 planned inputs are no longer in the inputs" in caplog.text
    record = Dataset(str(copy)).history()[-1]
    assert record["inputs_missing"] == 2 and record["inputs_added"] == 1
    assert summary["inputs"]["planned"] == steps[-1]["summary"]["inputs"]["planned"] + 1
    assert {k: v for k, v in shard_bytes(copy).items() if k in steps[-1]["shards"]} == steps[-1][
        "shards"
    ]


def test_taken_down_samples_are_not_appended_again(tmp_path, grown, demo_inputs, lite_models):
    from fgid.removal import remove_samples

    folder, out, config, steps = grown
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    remove_samples(str(copy), sources=[str(folder / "tom_hanks.png")], reason="ticket 7")
    before = identities(copy)
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(folder.iterdir())))
    build([str(listing), str(demo_inputs)], str(copy), config, lite_models, append=True)
    sources = index(copy)["source"].to_pylist()
    assert str(folder / "tom_hanks.png") not in sources
    assert str(demo_inputs / "tom_hanks.png") in sources  # another path: another input
    assert {k: identities(copy)[k] for k in before} == before
    assert Dataset(str(copy)).history()[-1]["inputs_added"] == len(list(demo_inputs.iterdir()))
