from __future__ import annotations

import pytest

from fgid.inputs import collect_sources, plan_shards, plan_table, plans_from_table, sample_key


def test_folders_lists_and_files_expand_sorted_without_repeats(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name in ["a/2.jpg", "a/1.PNG", "a/sub/3.webp", "a/readme.md", "a/.hidden.jpg", "x y.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nx y.jpg\na/2.jpg\n\nmissing.jpg\n")
    sources = collect_sources([str(tmp_path / "a"), str(listing), str(tmp_path / "a" / "2.jpg")])
    names = [s.removeprefix(str(tmp_path) + "/") for s in sources]
    assert names == ["a/1.PNG", "a/2.jpg", "a/sub/3.webp", "missing.jpg", "x y.jpg"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        collect_sources([str(tmp_path / "nope" / "dir")])


def test_plan_is_deterministic_and_round_trips(tmp_path):
    for i in range(7):
        (tmp_path / f"img.{i}.v2.jpg").write_bytes(b"x")
    labels = tmp_path / "identity.txt"
    labels.write_text("img.3.v2.jpg 42\n")
    plans = plan_shards([str(tmp_path)], shard_size=3, labels_file=str(labels))
    assert [len(p.items) for p in plans] == [3, 3, 1]
    assert [p.shard_id for p in plans] == [0, 1, 2]
    assert plans == plan_shards([str(tmp_path)], shard_size=3, labels_file=str(labels))
    assert plans_from_table(plan_table(plans)) == plans
    keys = [it.key for p in plans for it in p.items]
    assert len(set(keys)) == 7 and all("." not in k for k in keys)
    assert [it.label for p in plans for it in p.items if it.label] == ["42"]
    assert sample_key("/a/b.jpg") != sample_key("/a/b.jpg ")


def test_bad_label_file_names_the_line(tmp_path):
    labels = tmp_path / "identity.txt"
    labels.write_text("a.jpg 1\nb.jpg\n")
    with pytest.raises(ValueError, match=r"identity.txt:2"):
        plan_shards([str(tmp_path)], 2, str(labels))
