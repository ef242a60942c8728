"""`export_consistentid` on real builds: the reference trainer's layout, read as it reads it."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from fgid.dataset import NotADataset
from fgid.export import JSON_NAME, MANIFEST_NAME, EmbeddingDimError, export_consistentid
from fgid.pipeline import build
from fgid.removal import remove_samples

REFERENCE_FIELDS = {
    "resize_IMG",
    "parsing_mask_IMG",
    "vqa_llva",
    "vqa_llva_more_face_detail",
    "id_embed_file_resize",
    "id_embed_file_origin",
}


@pytest.fixture(scope="module")
def full_dataset(tmp_path_factory, demo_inputs, full_config):
    """A build with the full model set (tiny stand-in weights): 512-d embeddings, 512 crops."""
    out = tmp_path_factory.mktemp("export-full") / "ds"
    assert build([str(demo_inputs)], str(out), full_config)["embedding_dim"] == 512
    return out


@pytest.fixture(scope="module")
def lite_dataset(tmp_path_factory, demo_inputs, lite_config, lite_models):
    """A lite build (128-d dlib embeddings) with 256-pixel crops, to exercise the resize."""
    config = lite_config.with_overrides(**{"align.size": 256})
    out = tmp_path_factory.mktemp("export-lite") / "ds"
    build([str(demo_inputs)], str(out), config, lite_models)
    return out


@pytest.fixture(scope="module")
def exported(full_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("consistentid") / "out"
    return out, export_consistentid(str(full_dataset), str(out))


def shard_samples(dataset) -> dict[str, dict]:
    """Every sample of the shards, raw bytes by member, read with webdataset."""
    urls = sorted(str(p) for p in (dataset / "shards").glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def identities(dataset) -> list[dict]:
    return pq.read_table(dataset / "identities.parquet").to_pylist()


def reference_style_loader(json_file, image_root, parsing_root, faceid_root):
    """What the reference trainer's dataset does with each record, minus the model inputs."""
    with open(json_file) as handle:
        data = json.load(handle)
    for item in data:
        mask = Image.open(os.path.join(parsing_root, item["parsing_mask_IMG"]))
        values = np.unique(np.array(mask))
        parts = {int(v): np.uint8(np.array(mask) == v) * 255 for v in values}
        faceid_file = item.get("id_embed_file_origin") or item.get("id_embed_file_resize")
        image = Image.open(os.path.join(image_root, item["resize_IMG"])).convert("RGB")
        embed = torch.load(os.path.join(faceid_root, faceid_file))
        text = "Caption:" + item["vqa_llva"] + " Detail:" + item["vqa_llva_more_face_detail"]
        yield {"image": np.asarray(image), "parts": parts, "face_id_embed": embed, "text": text}


def test_export_matches_the_shards(full_dataset, exported):
    out, summary = exported
    rows = identities(full_dataset)
    kept = [r for r in rows if not r["duplicate_of"]]
    assert len(kept) < len(rows)  # the demo photos hold an exact duplicate
    records = json.loads((out / JSON_NAME).read_text())
    assert [r["key"] for r in records] == [r["key"] for r in kept]
    assert summary["samples"] == len(records) and summary["skipped_duplicates"] == len(rows) - len(
        kept
    )
    assert summary["embedding_dim"] == 512 and summary["reference_compatible"]
    assert summary["resized_to_512"] == 0 and summary["written"] == 3 * len(records)
    shards = shard_samples(full_dataset)
    identity = {r["key"]: r["identity"] for r in rows}
    for record in records:
        assert set(record) == REFERENCE_FIELDS | {"key", "identity"}
        sample = shards[record["key"]]
        assert record["identity"] == identity[record["key"]]
        assert record["resize_IMG"] == f"images/{record['key']}.jpg"  # relative to OUT
        image = np.asarray(Image.open(out / record["resize_IMG"]))
        assert image.shape == (512, 512, 3) and image.dtype == np.uint8
        mask = np.asarray(Image.open(out / record["parsing_mask_IMG"]))
        assert mask.shape == (512, 512) and mask.dtype == np.uint8 and mask.max() <= 18
        assert np.array_equal(mask, np.asarray(Image.open(io.BytesIO(sample["mask.png"]))))
        assert record["id_embed_file_resize"] == record["id_embed_file_origin"]
        embed = torch.load(out / record["id_embed_file_resize"])
        assert embed.dtype == torch.float32 and embed.shape == (1, 512)
        assert np.array_equal(embed[0].numpy(), np.load(io.BytesIO(sample["id.npy"])))
        assert record["vqa_llva"] == sample["caption.txt"].decode()
        assert record["vqa_llva_more_face_detail"] == sample["facial.txt"].decode()


def test_reference_style_loader_reads_the_export(exported):
    out, summary = exported
    root = str(out)  # the one root for images, parsing masks and id embeddings
    items = list(reference_style_loader(out / JSON_NAME, root, root, root))
    assert len(items) == summary["samples"] > 0
    embeds = torch.stack([item["face_id_embed"] for item in items])  # its collate_fn
    assert embeds.shape == (len(items), 1, 512)
    for item in items:
        assert item["image"].shape == (512, 512, 3)
        assert 0 in item["parts"] and 1 in item["parts"]  # background and skin (face)
        assert item["text"].startswith("Caption:")


def test_rerun_rewrites_nothing_and_duplicates_are_opt_in(full_dataset, exported, tmp_path):
    out, first = exported
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    again = export_consistentid(str(full_dataset), str(copy))
    assert again["written"] == 0 and again["unchanged"] == first["files"]
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before

    with_dups = export_consistentid(str(full_dataset), str(copy), include_duplicates=True)
    assert with_dups["samples"] == first["samples"] + first["skipped_duplicates"]
    assert with_dups["written"] == 3 * first["skipped_duplicates"]
    back = export_consistentid(str(full_dataset), str(copy))
    assert back["pruned"] == 3 * first["skipped_duplicates"]
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_reexport_after_takedown_deletes_the_removed_files(full_dataset, exported, tmp_path):
    dataset, out = tmp_path / "ds", tmp_path / "out"
    shutil.copytree(full_dataset, dataset)
    shutil.copytree(exported[0], out)
    gone = json.loads((out / JSON_NAME).read_text())[0]
    remove_samples(str(dataset), identity=gone["identity"], reason="test ticket")
    summary = export_consistentid(str(dataset), str(out))
    records = json.loads((out / JSON_NAME).read_text())
    assert gone["identity"] not in {r["identity"] for r in records}
    assert summary["pruned"] >= 3
    assert not any(gone["key"] in p.name for p in out.rglob("*"))


def test_reexport_deletes_only_files_it_wrote(full_dataset, exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported[0], out)
    mine = {out / "images" / "my-photo.jpg": b"a user's own file", out / "notes.pt": b"x"}
    for path, data in mine.items():
        path.write_bytes(data)
    listed = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert len(listed) == exported[1]["files"]
    assert export_consistentid(str(full_dataset), str(out))["pruned"] == 0
    assert all(path.read_bytes() == data for path, data in mine.items())


def test_lite_embeddings_are_refused_naming_the_dimension(lite_dataset, tmp_path):
    with pytest.raises(EmbeddingDimError, match=r"128-d.*--models full") as error:
        export_consistentid(str(lite_dataset), str(tmp_path / "out"))
    assert isinstance(error.value, ValueError)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_allow_any_dim_resizes_to_512_and_says_so(lite_dataset, tmp_path):
    out = tmp_path / "out"
    summary = export_consistentid(str(lite_dataset), str(out), allow_any_dim=True)
    assert summary["embedding_dim"] == 128 and not summary["reference_compatible"]
    assert summary["resized_to_512"] == summary["samples"] > 0
    shards = shard_samples(lite_dataset)
    for record in json.loads((out / JSON_NAME).read_text()):
        assert Image.open(out / record["resize_IMG"]).size == (512, 512)
        mask = np.asarray(Image.open(out / record["parsing_mask_IMG"]))
        small = np.asarray(Image.open(io.BytesIO(shards[record["key"]]["mask.png"])))
        assert small.shape == (256, 256) and mask.shape == (512, 512)
        assert np.array_equal(mask[::2, ::2], small)  # nearest: ids copied, none invented
        assert torch.load(out / record["id_embed_file_origin"]).shape == (1, 128)


def test_a_folder_that_is_not_a_build_is_refused(tmp_path):
    with pytest.raises(NotADataset, match="no build.json"):
        export_consistentid(str(tmp_path), str(tmp_path / "out"))
