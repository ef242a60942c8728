"""Takedown of an identity or of source files from a real lite build: gone, the rest intact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

import storage
from fgid.inputs import sample_key
from fgid.pipeline import build
from fgid.removal import RemovalPending, remove_samples

ASTRONAUTS = (
    "astronaut copy.png",
    "astronaut flipped.jpg",
    "astronaut-brighter.jpg",
    "astronaut.png",
)


@pytest.fixture(scope="module")
def original(tmp_path_factory, demo_inputs, lite_config, lite_models):
    out = tmp_path_factory.mktemp("removal") / "ds"
    build([str(demo_inputs)], str(out), lite_config, lite_models)
    return out


@pytest.fixture()
def dataset(original, tmp_path):
    """A private copy of the built dataset (a build takes seconds, a copy milliseconds)."""
    out = tmp_path / "ds"
    shutil.copytree(original, out)
    return out


def members(out) -> dict[str, bytes]:
    found = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                found[info.name] = tar.extractfile(info).read()
    return found


def files(out) -> dict[str, bytes]:
    """Every dataset file but the removal records, by relative path."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "removals" not in p.parts
    }


def identity_of(out, key: str) -> str:
    rows = pq.read_table(out / "identities.parquet").to_pylist()
    return next(r["identity"] for r in rows if r["key"] == key)


def assert_gone(out, keys: set[str], sources: list[str]) -> None:
    """No shard, index, plan or identity row holds the keys; no member mentions the sources."""
    tar_keys = {name.split(".", 1)[0] for name in members(out)}
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    wds_keys = {s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)}
    assert tar_keys and wds_keys == tar_keys and not tar_keys & keys
    index = pq.read_table(sorted(str(p) for p in (out / "shards").glob("*.parquet")))
    plan = pq.read_table(out / "plan.parquet")
    identities = pq.read_table(out / "identities.parquet")
    for table in (index, plan, identities):
        assert not set(table["key"].to_pylist()) & keys
    for table in (index, plan):
        assert not set(table["source"].to_pylist()) & set(sources)
    for name, data in members(out).items():
        if name.endswith((".json", ".txt")):
            assert not any(s.encode() in data for s in sources), name


def assert_rest_untouched(before: dict, after: dict, keys: set[str]) -> None:
    kept = {name: data for name, data in before.items() if name.split(".", 1)[0] not in keys}
    assert after == kept


def test_remove_identity_everywhere(dataset, demo_inputs):
    sources = [str(demo_inputs / name) for name in ASTRONAUTS]
    keys = {sample_key(s) for s in sources}
    before, summary = members(dataset), json.loads((dataset / "summary.json").read_text())
    identity = identity_of(dataset, sample_key(sources[0]))

    result = remove_samples(dataset, identity=identity, reason="ticket 17")

    assert {s["key"] for s in result["samples"]} == keys and result["status"] == "done"
    assert_gone(dataset, keys, sources)
    assert_rest_untouched(before, members(dataset), keys)
    # The four astronauts filled shard 0: it is deleted, not left empty.
    assert result["shards"] == {"rewritten": [], "deleted": [0]}
    assert not list((dataset / "shards").glob("00000.*"))
    after = json.loads((dataset / "summary.json").read_text())
    assert after["samples"] == summary["samples"] - 4
    assert (
        after["inputs"]["planned"] == after["inputs"]["indexed"] == summary["inputs"]["planned"] - 4
    )
    assert after["identities"]["total"] == summary["identities"]["total"] - 1
    assert after["complete"] and after["shards"] == {"planned": 2, "done": 2}
    (path,) = (dataset / "removals").glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "done" and record["reason"] == "ticket 17"
    assert record["request"] == {"identity": identity}
    assert {s["key"] for s in record["samples"]} == keys
    assert {s["sha256"] for s in record["samples"]} == {
        hashlib.sha256((demo_inputs / n).read_bytes()).hexdigest() for n in ASTRONAUTS
    }
    assert "astronaut" not in path.read_text()  # keys and hashes, no paths
    with pytest.raises(ValueError, match="removed already"):  # its name may now be someone else's
        remove_samples(dataset, identity=identity, reason="ticket 17")


def test_remove_sources_by_path_and_content_hash(dataset, demo_inputs):
    by_path = ["grace_hopper.jpg", "coffee (no face).png"]  # a kept sample and a rejected row
    photo = hashlib.sha256((demo_inputs / "astronaut.png").read_bytes()).hexdigest()
    names = [*by_path, "astronaut.png", "astronaut copy.png"]  # the hash finds both copies
    sources = [str(demo_inputs / n) for n in names]
    keys = {sample_key(s) for s in sources}
    before, stats1 = members(dataset), json.loads((dataset / "shards/00001.stats.json").read_text())

    result = remove_samples(dataset, sources=[*sources[:2], f"sha256:{photo}"], reason="ticket 18")

    assert {s["key"] for s in result["samples"]} == keys
    assert result["shards"] == {"rewritten": [0, 1], "deleted": []}
    assert_gone(dataset, keys, sources)
    assert_rest_untouched(before, members(dataset), keys)
    stats = json.loads((dataset / "shards/00001.stats.json").read_text())
    assert (stats["inputs"], stats["ok"], stats["rejected"], stats["removed"]) == (2, 2, 0, 2)
    assert stats["reasons"] == {} and stats1["reasons"] == {"no_face": 1}
    assert stats["tar_bytes"] == sum(
        len(d)
        for n, d in members(dataset).items()
        if n.split(".")[0]
        in {r["key"] for r in pq.read_table(dataset / "shards/00001.parquet").to_pylist()}
    )
    record = (dataset / "removals").glob("*.json").__next__().read_text()
    assert "grace" not in record and "coffee" not in record
    # The same request again is a no-op naming the earlier record; an unmatched entry is an error.
    again = remove_samples(dataset, sources=sources[:1], reason="ticket 18")
    assert again["id"] == result["id"] and again["shards"] == {}
    with pytest.raises(ValueError, match="nobody.jpg"):
        remove_samples(dataset, sources=[str(demo_inputs / "nobody.jpg")], reason="ticket 19")


def test_rebuild_does_not_bring_them_back(
    dataset, demo_inputs, lite_config, lite_models, monkeypatch
):
    key = sample_key(str(demo_inputs / "astronaut.png"))
    remove_samples(dataset, identity=identity_of(dataset, key), reason="ticket 20")
    removed, summary = files(dataset), json.loads((dataset / "summary.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in (dataset / "shards").iterdir()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a finished shard was rebuilt")

    monkeypatch.setattr("fgid.pipeline.process_shard", no_rebuild)
    assert build([str(demo_inputs)], str(dataset), lite_config, lite_models) == summary
    assert files(dataset) == removed
    assert {p: p.stat().st_mtime_ns for p in (dataset / "shards").iterdir()} == mtimes


def test_interrupted_removal_is_whole_and_completed_by_rerun(
    dataset, original, tmp_path, demo_inputs, lite_config, lite_models, monkeypatch
):
    sources = [str(demo_inputs / n) for n in ("grace_hopper.jpg", "tom_hanks.png")]  # shards 1, 2
    reference = tmp_path / "reference"
    shutil.copytree(original, reference)
    remove_samples(reference, sources=sources, reason="ticket 21")
    old, new = files(original), files(reference)
    real_open = storage.atomic_open

    @contextlib.contextmanager
    def failing_open(url):
        with real_open(url) as handle:
            yield handle
            if str(url).endswith("00002.parquet"):  # shard 2's index, after its new tar
                raise OSError("disk full")

    monkeypatch.setattr(storage, "atomic_open", failing_open)
    with pytest.raises(OSError, match="disk full"):
        remove_samples(dataset, sources=sources, reason="ticket 21")
    monkeypatch.undo()

    now = files(dataset)
    assert set(now) == set(old) == set(new)  # no temporary left behind
    for name, data in now.items():
        assert data in (old[name], new[name]), name  # each file old-complete or new-complete
    assert now["shards/00001.parquet"] == new["shards/00001.parquet"]
    assert now["shards/00002.tar"] == new["shards/00002.tar"] != old["shards/00002.tar"]
    assert now["shards/00002.parquet"] == old["shards/00002.parquet"]
    (path,) = (dataset / "removals").glob("*.json")
    assert json.loads(path.read_text())["status"] == "pending"
    with pytest.raises(RemovalPending):
        build([str(demo_inputs)], str(dataset), lite_config, lite_models)

    result = remove_samples(dataset, sources=sources, reason="ticket 21")

    assert result["status"] == "done" and result["resumed"] == [result["id"]]
    # The card's title names its folder, and `new` was made in another folder.
    ours, theirs = files(dataset), dict(new)
    assert (
        ours.pop("card/README.md").split(b"\n", 1)[1]
        == theirs.pop("card/README.md").split(b"\n", 1)[1]
    )
    assert ours == theirs
    assert json.loads(path.read_text())["status"] == "done"


def test_unknown_identity_is_a_value_error(dataset):
    with pytest.raises(ValueError, match="cluster-999999"):
        remove_samples(dataset, identity="cluster-999999", reason="ticket 22")
    with pytest.raises(ValueError, match="exactly one"):
        remove_samples(dataset, reason="ticket 22")
    assert not (dataset / "removals").exists()


def test_url_sources_are_matched_as_the_plan_spells_them(tmp_path, monkeypatch):
    from fgid.inputs import sample_key as planned_key
    from fgid.removal import _source

    monkeypatch.chdir(tmp_path)
    url = "s3://bucket/photos/a.jpg"
    assert sample_key(_source(url)) == planned_key(url)  # abspath would make it ./s3:/bucket/...
    assert _source("photos/a.jpg") == str(tmp_path / "photos" / "a.jpg")
