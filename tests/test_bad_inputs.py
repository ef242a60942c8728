"""A build over broken and awkward inputs: each input becomes one row with the right reason."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from fgid.inputs import UNDECODABLE
from fgid.pipeline import build
from fgid.schema import REASONS, reason_code
from fgid.stages.detect import choose_primary
from tests.corpus import (
    EXIF_ROTATED,
    GROUP,
    NON_UTF8_NAME,
    NON_UTF8_SHOWN,
    NOT_REGULAR_KINDS,
    UNICODE_NAME,
    UNREADABLE_KINDS,
    corpus_inputs,
    make_bad_corpus,
)
from tests.photos import astronaut


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_corpus")
    return folder, make_bad_corpus(folder)


@pytest.fixture(scope="module")
def built(corpus, lite_config, lite_models, tmp_path_factory):
    folder, expected = corpus
    config = lite_config.model_copy(update={"shard_size": 4, "batch_size": 3})
    out = tmp_path_factory.mktemp("bad_build")
    summary = build(corpus_inputs(folder), out, config, models=lite_models)
    shards = sorted((out / "shards").glob("[0-9]*.parquet"))
    index = pa.concat_tables([pq.read_table(p) for p in shards]).to_pylist()
    return out, summary, index, expected


def by_name(index: list[dict]) -> dict[str, dict]:
    return {Path(row["source"]).name: row for row in index}


def test_corpus_expectations_use_known_reason_codes(corpus):
    _, expected = corpus
    assert set(expected.values()) - {"ok"} <= set(REASONS)
    # The corpus covers every decode failure it promises, plus detection and the happy path.
    for code in (
        "empty_file",
        "truncated",
        "not_an_image",
        "too_small",
        "too_large",
        "no_face",
        "unreadable",
        "not_regular_file",
        "ok",
    ):
        assert code in expected.values()


def test_unreadable_entries_really_cannot_be_read(corpus):
    folder, expected = corpus
    unreadable = [name for name, outcome in expected.items() if outcome == "unreadable"]
    # Mode 000 only blocks reading for non-root users; the corpus includes it only then.
    assert ("locked.jpg" in unreadable) == (os.geteuid() != 0)
    assert {"broken_link.jpg", "missing.jpg", NON_UTF8_SHOWN} <= set(unreadable)
    assert set(unreadable) <= set(UNREADABLE_KINDS)
    for name in set(unreadable) - {NON_UTF8_SHOWN}:
        candidates = [folder / "images" / name, folder / name]
        for path in candidates:
            with pytest.raises(OSError):
                path.read_bytes()
    # The undecodable name is a real photo: only its name cannot be stored as text.
    assert (os.fsencode(folder / "images") + b"/" + NON_UTF8_NAME) in {
        os.fsencode(p) for p in (folder / "images").iterdir()
    }
    special = [name for name, outcome in expected.items() if outcome == "not_regular_file"]
    assert set(special) == set(NOT_REGULAR_KINDS)
    assert all((folder / "images" / name).is_dir() for name in special)


def test_build_completes_with_several_shards(built):
    out, summary, index, expected = built
    assert summary["complete"] is True
    assert summary["shards"]["planned"] == summary["shards"]["done"] >= 4
    assert summary["inputs"]["planned"] == summary["inputs"]["indexed"] == len(expected)
    assert (out / "identities.parquet").is_file()


def test_every_input_appears_exactly_once(built):
    _, _, index, expected = built
    names = Counter(Path(row["source"]).name for row in index)
    assert names == Counter(list(expected))  # each expected name once, nothing else
    assert len({row["key"] for row in index}) == len(index)
    assert {row["status"] for row in index} <= {"ok", "rejected"}


def test_each_input_gets_its_expected_outcome(built):
    _, _, index, expected = built
    got = {
        name: "ok" if row["status"] == "ok" else reason_code(row["reason"])
        for name, row in by_name(index).items()
    }
    assert got == expected


def test_rejected_rows_carry_a_reason_and_no_payload(built):
    _, _, index, _ = built
    rejected = [row for row in index if row["status"] == "rejected"]
    assert rejected
    for row in rejected:
        assert row["reason"] and reason_code(row["reason"]) in REASONS
        assert row["embedding"] is None
    for row in index:
        if row["status"] == "ok":
            assert row["reason"] is None
            assert len(row["embedding"]) == 128


def test_group_photo_records_all_faces(built):
    _, _, index, _ = built
    row = by_name(index)[GROUP]
    assert row["status"] == "ok"
    assert row["face_count"] >= 4


def test_an_undecodable_name_is_one_row_marked_as_such(built):
    _, _, index, _ = built
    row = by_name(index)[NON_UTF8_SHOWN]
    assert row["status"] == "rejected"
    assert row["reason"] == "unreadable: file name is not valid UTF-8"
    assert row["source"].startswith(UNDECODABLE) and "\\xe9" in row["source"]


def test_unicode_name_with_dots_and_spaces_is_kept(built):
    _, _, index, _ = built
    row = by_name(index)[UNICODE_NAME]
    assert row["status"] == "ok"
    assert "." not in row["key"] and " " not in row["key"]
    assert Path(row["source"]).name == UNICODE_NAME


def test_tars_hold_kept_samples_and_only_those(built):
    out, _, index, _ = built
    urls = sorted(str(p) for p in (out / "shards").glob("[0-9]*.tar"))
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert set(sample) >= {"jpg", "mask.png", "id.npy", "caption.txt", "facial.txt", "json"}
        seen[sample["__key__"]] = json.loads(sample["json"])
    kept = {row["key"]: row for row in index if row["status"] == "ok"}
    assert set(seen) == set(kept)
    for key, meta in seen.items():
        assert meta["source"] == kept[key]["source"]
        # The lite parser never looks for ears: the sample says so rather than "no ears".
        assert meta["regions"]["unseen"] == ["ears"]
        assert "ears" not in meta["regions"]["present"]


def test_summary_counts_rejection_reasons(built):
    _, summary, _, expected = built
    want = Counter(outcome for outcome in expected.values() if outcome != "ok")
    assert summary["rejection_reasons"] == dict(want)
    assert summary["rejected"] == sum(want.values())
    assert summary["samples"] == sum(1 for outcome in expected.values() if outcome == "ok")


def test_decode_records_source_facts(built):
    out, _, index, _ = built
    rows = by_name(index)
    metas = {}
    urls = sorted(str(p) for p in (out / "shards").glob("[0-9]*.tar"))
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        metas[Path(meta["source"]).name] = meta["source_info"]
    assert metas["cmyk.jpg"]["mode"] == "CMYK"
    assert metas["gray16.png"]["mode"].startswith("I;16")
    assert metas["gray16.png"]["bit_depth"] == 16
    assert metas["palette.png"]["mode"] == "P"
    assert metas["rgba_transparent.png"]["alpha_composited"] is True
    assert metas["la.png"]["mode"] == "LA"
    assert metas[EXIF_ROTATED]["exif_orientation"] == 6
    assert (rows[GROUP]["width"], rows[GROUP]["height"]) == (1280, 886)


def test_exif_orientation_is_honoured(built, lite_models):
    _, _, index, _ = built
    folder_file = Path(by_name(index)[EXIF_ROTATED]["source"])
    upright = astronaut()
    detector, embedder = lite_models.detector, lite_models.embedder
    upright_face = choose_primary(detector.detect([upright])[0])
    reference = embedder.embed([upright], [upright_face])[0]

    row = by_name(index)[EXIF_ROTATED]
    assert row["status"] == "ok"
    assert np.linalg.norm(np.asarray(row["embedding"]) - reference) < 0.4

    # Control: the same file read without applying the EXIF tag does not give this person.
    stored = np.asarray(Image.open(folder_file).convert("RGB"))
    assert stored.shape == upright.shape  # square photo: only the content is turned
    assert not np.array_equal(stored, upright)
    faces = detector.detect([stored])[0]
    if faces:
        sideways = embedder.embed([stored], [choose_primary(faces)])[0]
        assert np.linalg.norm(sideways - reference) > 0.6
