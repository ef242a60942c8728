"""A plain-Python build of real photos, read back with plain webdataset and pyarrow."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from fgid.dataset import Dataset
from fgid.pipeline import OutputMismatch, build, process_shard, shard_done
from fgid.schema import CAPTION_PROMPT, INDEX_SCHEMA, SAMPLE_FIELDS


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_inputs, lite_config, lite_models):
    out = tmp_path_factory.mktemp("built") / "ds"
    summary = build([str(demo_inputs)], out, lite_config, lite_models)
    return out, summary


def test_every_input_has_exactly_one_index_row(built, demo_inputs):
    out, summary = built
    table = read_index(out)
    assert table.schema.equals(INDEX_SCHEMA)
    sources = sorted(table.column("source").to_pylist())
    assert sources == sorted(str(p) for p in demo_inputs.iterdir())
    assert summary["inputs"]["indexed"] == len(sources) == summary["samples"] + summary["rejected"]
    reasons = dict(zip(table["source"].to_pylist(), table["reason"].to_pylist(), strict=True))
    assert reasons[str(demo_inputs / "coffee (no face).png")] == "no_face"
    assert reasons[str(demo_inputs / "notes.jpg")].startswith("not_an_image")


def test_plain_webdataset_reads_every_field(built):
    out, summary = built
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("rgb8"))
    assert len(samples) == summary["samples"] > 0
    for sample in samples:
        assert set(SAMPLE_FIELDS) <= set(sample)
        assert "." not in sample["__key__"]
        image, mask = (
            sample["jpg"],
            np.asarray(Image.open(io.BytesIO(_raw(out, sample, "mask.png")))),
        )
        assert image.shape == (512, 512, 3) and mask.shape == (512, 512) and mask.max() <= 18
        meta = sample["json"]
        assert meta["key"] == sample["__key__"]
        for field in (
            "source",
            "original_size",
            "face",
            "age",
            "gender",
            "identity",
            "regions",
            "models",
            "config_hash",
            "embedding",
            "aligned",
            "sha256",
        ):
            assert field in meta, field
        assert len(meta["face"]["box"]) == 4 and len(meta["face"]["landmarks"]) == 5
        assert meta["face"]["count"] >= 1
        assert meta["embedding"]["dim"] == 128
        assert np.load(io.BytesIO(_raw(out, sample, "id.npy"))).shape == (128,)
        assert sample["caption.txt"] and sample["facial.txt"]
    assert CAPTION_PROMPT  # prompts are verbatim constants (checked in test_schema)


def read_index(out):
    """What a user without fgid does: pyarrow over the Parquet files beside the tars."""
    return pq.read_table(sorted(str(p) for p in (out / "shards").glob("*.parquet")))


def _raw(out, sample, ext):
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            try:
                return tar.extractfile(f"{sample['__key__']}.{ext}").read()
            except KeyError:
                continue
    raise AssertionError(f"{sample['__key__']}.{ext} not in any shard")


def test_transform_maps_landmarks_into_the_crop(built):
    out, _ = built
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    for sample in wds.WebDataset(shards, shardshuffle=False).decode():
        meta = sample["json"]
        m = np.asarray(meta["aligned"]["transform"])
        pts = np.asarray(meta["face"]["landmarks"]) @ m[:, :2].T + m[:, 2]
        # FFHQ alignment puts the eyes at ~38-40% height, mouth at ~65%, centred horizontally.
        assert 0.3 < pts[:2, 1].mean() / 512 < 0.5
        assert 0.55 < pts[3:, 1].mean() / 512 < 0.8
        assert abs(pts[:, 0].mean() / 512 - 0.5) < 0.08


def test_summary_reports_identities_duplicates_and_distributions(built):
    out, summary = built
    assert summary["complete"] and summary == json.loads((out / "summary.json").read_text())
    assert summary["duplicates"]["exact"] == 1  # "astronaut copy.png" is a byte copy
    ids = pq.read_table(out / "identities.parquet").to_pylist()
    by_name = {}
    index = read_index(out).to_pylist()
    source_of = {r["key"]: r["source"].rsplit("/", 1)[1] for r in index}
    for row in ids:
        by_name[source_of[row["key"]]] = row
    astro = {by_name[n]["identity"] for n in by_name if n.startswith("astronaut")}
    assert len(astro) == 1
    # The first of the two in plan order (sorted source paths) is kept as canonical.
    first, second = sorted(["astronaut copy.png", "astronaut.png"])
    assert by_name[second]["duplicate_of"] == by_name[first]["key"]
    assert by_name[first]["duplicate_of"] is None
    assert by_name["tom_hanks.png"]["identity"] not in astro
    assert sum(summary["gender"].values()) == summary["samples"]
    assert sum(summary["age"]["histogram"].values()) == summary["samples"]
    assert summary["identities"]["recognizable"] >= 1
    assert summary["regions_present"]["ears"] == 0  # the lite parser cannot see ears
    assert summary["regions_present"]["eyes"] == summary["samples"]
    wait = summary["model_input_wait"]
    assert wait["seconds"] >= 0 and 0 <= wait["fraction"] <= 1


def test_rerun_skips_done_shards_and_refuses_other_settings(built, demo_inputs, lite_config):
    out, summary = built
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    assert build([str(demo_inputs)], out, lite_config) == summary
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    with pytest.raises(OutputMismatch, match="another configuration") as error:
        build([str(demo_inputs)], out, lite_config.with_overrides(**{"align.size": 256}))
    assert "align.size 512 -> 256" in str(error.value) and "new --out" in str(error.value)
    inputs = len(list(demo_inputs.iterdir()))
    with pytest.raises(OutputMismatch, match="other inputs") as error:
        build([str(demo_inputs / "astronaut.png")], out, lite_config)
    assert f"{inputs - 1} missing since the first run" in str(error.value)
    assert "the inputs of the first run" in str(error.value)


def test_failed_shard_leaves_nothing_behind(tmp_path, demo_inputs, lite_config, lite_models):
    from fgid.pipeline import prepare_output

    prepare_output([str(demo_inputs)], tmp_path, lite_config)
    plans = Dataset(tmp_path).read_plan()

    class Exploding:
        name, unseen_classes = "boom", frozenset()

        def parse(self, aligned, dense):
            raise KeyboardInterrupt  # not a per-sample failure: the shard must abort cleanly

    models = type(lite_models)(**{**lite_models.__dict__, "parser": Exploding()})
    with pytest.raises(KeyboardInterrupt):
        process_shard(plans[0], tmp_path, lite_config, models)
    assert not shard_done(tmp_path, 0)
    assert list((tmp_path / "shards").iterdir()) == []


def test_model_error_on_one_batch_becomes_stage_error_rows(
    tmp_path, demo_inputs, lite_config, lite_models
):
    from fgid.pipeline import prepare_output

    prepare_output([str(demo_inputs)], tmp_path, lite_config)
    plans = Dataset(tmp_path).read_plan()

    original = np.asarray(Image.open(demo_inputs / "astronaut.png").convert("RGB"))

    class Picky:
        """Fails on astronaut.png (and its byte copy), not on its flipped or brightened variants."""

        name, dim = "picky", 128

        def embed(self, images, faces):
            if any(np.array_equal(image, original) for image in images):
                raise RuntimeError("cannot embed this one")
            return lite_models.embedder.embed(images, faces)

    models = type(lite_models)(**{**lite_models.__dict__, "embedder": Picky()})
    stats = process_shard(plans[0], tmp_path, lite_config, models)
    rows = pq.read_table(tmp_path / "shards" / "00000.parquet").to_pylist()
    errors = [r for r in rows if r["reason"] and r["reason"].startswith("stage_error")]
    assert len(errors) == 2  # astronaut.png and its byte copy; the variants pass
    assert all("embed: RuntimeError: cannot embed this one" in r["reason"] for r in errors)
    assert stats["reasons"]["stage_error"] == len(errors)
    assert stats["ok"] + stats["rejected"] == len(plans[0].items)
