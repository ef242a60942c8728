from __future__ import annotations

import os
from pathlib import Path

import pytest

from fgid.inputs import (
    UNDECODABLE,
    InputError,
    InputNotFound,
    check_inputs,
    collect_sources,
    plan_shards,
    sample_key,
)
from fgid.planfile import plan_table, plans_from_table


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


SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
CREDENTIAL_URLS = [
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/photos/a.jpg",
    f"simplecache::s3://AKIAEXAMPLE:{SECRET}@bucket/photos/a.jpg",
    f"https://host/a.jpg?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}",
]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
def test_urls_with_credentials_in_a_list_file_never_reach_the_plan(tmp_path, url):
    from fgid.config import BuildConfig
    from fgid.pipeline import prepare_output

    (tmp_path / "a.jpg").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"a.jpg\n# a comment\n{url}\n")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"list.txt:3: .*credentials refused") as caught:
        prepare_output([str(listing)], str(out), BuildConfig(models={"set": "lite"}))
    assert SECRET not in str(caught.value)
    assert not (out / "plan.parquet").exists()
    assert not [p for p, data in files_under(out).items() if SECRET.encode() in data]


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
def test_urls_with_credentials_as_inputs_or_labels_are_refused(tmp_path, url):
    (tmp_path / "a.jpg").write_bytes(b"x")
    for call in (
        lambda: plan_shards([url], 10),
        lambda: plan_shards([str(tmp_path)], 10, labels_file=url),
        lambda: check_inputs([str(tmp_path), url]),
    ):
        with pytest.raises(ValueError, match="credentials refused") as caught:
            call()
        assert SECRET not in str(caught.value)


def test_labels_file_problems_are_one_line_errors(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    folder = tmp_path / "labels.txt"
    folder.mkdir()
    long_line = "a.jpg " + "x " * 200
    bad = tmp_path / "bad.txt"
    bad.write_text(f"a.jpg 1\n\n{long_line}\n")
    cases = {
        str(tmp_path / "nope.txt"): "labels file not found: ",
        str(folder): "labels file is a directory, not a regular file",
        str(bad): r"bad.txt:3: expected '<file> <identity>', got 'a.jpg x x",
    }
    for labels, message in cases.items():
        with pytest.raises(InputError, match=message) as caught:
            plan_shards([str(tmp_path / "a.jpg")], 10, labels)
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_missing_input_is_refused_with_the_nearest_name(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(InputNotFound, match=r"did you mean .*photos/a.jpg\?"):
        collect_sources([str(tmp_path / "photso" / "a.jpg")])
    with pytest.raises(FileNotFoundError, match=r"input not found: .*/b.jpg"):
        collect_sources([str(tmp_path / "photos" / "b.jpg")])  # a typo is not a row


def test_check_inputs_lists_every_problem_before_anything_is_planned(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("no images here")
    assert check_inputs([str(tmp_path / "photos"), str(tmp_path / "photos" / "a.jpg")]) is None
    with pytest.raises(InputError) as caught:
        check_inputs([str(tmp_path / "photos"), str(tmp_path / "empty"), str(tmp_path / "phots")])
    assert caught.value.problems == [
        f"no images found in {tmp_path / 'empty'}",
        f"input not found: {tmp_path / 'phots'} (did you mean {tmp_path / 'photos'}?)",
    ]
    with pytest.raises(InputError, match="^no images found in the inputs: ") as caught:
        check_inputs([])
    with pytest.raises(InputError) as caught:
        check_inputs([str(tmp_path / "notes")])
    assert caught.value.problems == [f"no images found in {tmp_path / 'notes'}"]


def test_a_name_that_is_not_utf8_is_one_marked_source(tmp_path):
    (tmp_path / "good.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as handle:
        handle.write(b"x")
    plans = plan_shards([str(tmp_path)], 10)
    sources = [it.source for p in plans for it in p.items]
    assert sources == [str(tmp_path / "good.jpg"), UNDECODABLE + str(tmp_path / "caf\\xe9.jpg")]
    assert plans_from_table(plan_table(plans)) == plans  # storable as Parquet text


def test_a_build_output_inside_an_input_folder_is_never_an_input(
    demo_inputs, lite_config, lite_models, tmp_path
):
    import shutil

    from fgid.dataset import Dataset
    from fgid.pipeline import build, prepare_output

    photos = tmp_path / "photos"
    shutil.copytree(demo_inputs, photos)
    out = photos / "fgid-out"
    config = lite_config.model_copy(update={"shard_size": 50})
    first = build([str(photos)], out, config, lite_models)
    assert list((out / "card").glob("*.png"))  # images the build wrote inside the input folder
    again = prepare_output([str(photos)], str(out), config)  # would be refused if they counted
    assert sum(p.size for p in again) == first["inputs"]["planned"]
    assert not [it for p in Dataset(out).read_plan() for it in p.items if "fgid-out" in it.source]
    # Told explicitly, too (before the first run writes anything there).
    (photos / "later").mkdir()
    (photos / "later" / "x.png").write_bytes(b"x")
    sources = collect_sources([str(photos)], exclude=[str(photos / "later")])
    assert not [s for s in sources if "/later/" in s]


def test_plans_and_shard_indexes_written_before_provenance_columns_still_read(tmp_path):
    import pyarrow as pa

    from fgid.dataset import Dataset
    from fgid.schema import INDEX_SCHEMA

    (tmp_path / "a.jpg").write_bytes(b"x")
    plans = plan_shards([str(tmp_path)], 10)
    old_plan = plan_table(plans).select(["shard", "key", "source", "label"])
    assert plans_from_table(old_plan) == plans
    old_index = pa.schema([f for f in INDEX_SCHEMA if not f.name.startswith("source_")])
    dataset = Dataset(str(tmp_path / "out"))
    dataset.prepare()
    dataset.write_index(0, old_index.empty_table())
    assert dataset.read_index(0).schema.equals(INDEX_SCHEMA)


def test_finalize_columns_of_an_old_shard_index_read_as_nulls(tmp_path):
    import pyarrow as pa

    from fgid.dataset import Dataset
    from fgid.schema import INDEX_SCHEMA

    old_index = pa.schema([f for f in INDEX_SCHEMA if not f.name.startswith("source_")])
    dataset = Dataset(str(tmp_path / "out"))
    dataset.prepare()
    dataset.write_index(0, old_index.empty_table())
    dataset.index([n for n in INDEX_SCHEMA.names if n != "embedding"])


def test_web_urls_in_inputs_and_lists_are_sources_never_listed(tmp_path):
    listing = tmp_path / "urls.txt"
    listing.write_text("https://example.com/a.jpg\nhttp://example.com/b.jpg\n")
    assert check_inputs([str(listing), "https://example.com/c.jpg"]) is None
    sources = collect_sources([str(listing), "https://example.com/c.jpg"])
    assert sources == [
        "http://example.com/b.jpg",
        "https://example.com/a.jpg",
        "https://example.com/c.jpg",
    ]


def test_a_list_file_is_read_a_line_at_a_time_and_refused_at_its_first_bad_part(
    tmp_path, monkeypatch
):
    import fgid.inputs

    monkeypatch.setattr(fgid.inputs, "LINE_MAX_BYTES", 64)
    good = tmp_path / "good.txt"
    good.write_bytes(b"a.jpg\r\n\n# note\nsub/b.jpg")  # CRLF, a comment, no final newline
    assert collect_sources([str(good)]) == [str(tmp_path / "a.jpg"), str(tmp_path / "sub/b.jpg")]
    long = tmp_path / "long.txt"
    long.write_bytes(b"a.jpg\n" + b"x" * 65 + b".jpg\n")
    with pytest.raises(InputError, match=r"long.txt:2: a line longer than 64 bytes"):
        collect_sources([str(long)])
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"a.jpg\n\0\0")
    with pytest.raises(InputError, match="list file is not a text file"):
        check_inputs([str(binary)])
