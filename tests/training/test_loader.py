"""The training loaders on a real build: batch contracts, identity pairs, order, resume, ranks."""

from __future__ import annotations

import itertools
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch
from transformers import CLIPTokenizer

import training.loader as loader_module
from training.loader import LoaderConfig, consistentid_loader, faceclip_loader
from training.reference import decode_sample
from training.regions import (
    arcface_crop,
    clip_preprocess,
    region_images,
    region_masks,
    resize_label_map,
    to_unit_range,
)
from training.schedule import node_rank
from training.stream import webdataset
from training.text import REGION_WORDS, facial_token_id

SMALL = {
    "batch_size": 2,
    "resolution": 64,
    "clip_size": 32,
    "shuffle_buffer": 4,
    "seed": 7,
    "workers": 0,
}


def config(**changes) -> LoaderConfig:
    """Workers fork from one preloaded fork server here (seconds saved per worker); the spawned
    default is what test_loader_streams_from_object_storage runs."""
    changes.setdefault("start_method", "forkserver")
    return LoaderConfig(**{**SMALL, **changes})


def take(loader, n: int | None = None) -> list[dict]:
    return list(itertools.islice(loader, n))


def keys(batches: list[dict]) -> list[tuple[str, ...]]:
    return [tuple(b["key"]) for b in batches]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for name in x:
            if isinstance(x[name], torch.Tensor):
                assert torch.equal(x[name], y[name]), name
            else:
                assert x[name] == y[name], name


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dir):
    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir)


@pytest.fixture(scope="module")
def decoded(built_dataset):
    """key -> Reference, decoded straight from the stream."""
    found = {}
    for raw in webdataset(str(built_dataset)):
        members = {k: v for k, v in raw.items() if not k.startswith("__")}
        found[raw["__key__"]] = decode_sample(members, raw["__key__"], "-")
    return found


@pytest.fixture(scope="module")
def identities(built_dataset):
    return {r["key"]: r for r in pq.read_table(built_dataset / "identities.parquet").to_pylist()}


@pytest.fixture(scope="module")
def epoch(built_dataset, tokenizer):
    """One finite pass of ConsistentID batches, in process."""
    return take(consistentid_loader(str(built_dataset), tokenizer, config(resampled=False)))


def test_consistentid_batches_follow_the_contract(epoch, decoded, tokenizer):
    facial = facial_token_id(tokenizer)
    assert sum(len(b["key"]) for b in epoch) == 11
    for batch in epoch:
        n = len(batch["key"])
        expect = {
            "pixel_values": ((n, 3, 64, 64), torch.float32),
            "foreground_mask": ((n, 1, 64, 64), torch.float32),
            "region_masks": ((n, 5, 64, 64), torch.float32),
            "region_present": ((n, 5), torch.bool),
            "input_ids": ((n, 77), torch.long),
            "region_token_index": ((n, 5), torch.long),
            "has_reference": ((n,), torch.bool),
            "ref_face_pixel_values": ((n, 3, 32, 32), torch.float32),
            "ref_region_pixel_values": ((n, 5, 3, 32, 32), torch.float32),
            "ref_region_present": ((n, 5), torch.bool),
            "ref_id_embeds": ((n, 128), torch.float32),
        }
        for name, (shape, dtype) in expect.items():
            assert (tuple(batch[name].shape), batch[name].dtype) == (shape, dtype), name
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        for i, key in enumerate(batch["key"]):
            target, ref = decoded[key], decoded[batch["ref_key"][i]]
            label = resize_label_map(target.label_map, 64)
            masks = region_masks(label)
            assert torch.equal(batch["region_masks"][i], torch.from_numpy(masks).float())
            assert torch.equal(batch["foreground_mask"][i, 0], torch.from_numpy(label > 0).float())
            assert batch["region_present"][i].tolist() == masks.any(axis=(1, 2)).tolist()
            assert torch.equal(batch["pixel_values"][i], to_unit_range(target.image, 64))
            # Reference side: whole face and region images through CLIP preprocessing.
            present = region_masks(ref.label_map).any(axis=(1, 2))
            assert batch["ref_region_present"][i].tolist() == present.tolist()
            views = clip_preprocess(region_images(ref.image, ref.label_map), 32)
            for r in range(5):
                got = batch["ref_region_pixel_values"][i, r]
                assert torch.equal(got, views[r] if present[r] else torch.zeros_like(got))
            assert torch.equal(batch["ref_face_pixel_values"][i], clip_preprocess(ref.image, 32))
            assert torch.equal(batch["ref_id_embeds"][i], torch.from_numpy(ref.embedding))
            # Text, the released model's path: markers removed, a region word fused only for
            # regions present in both images (this parser never sees ears).
            index = batch["region_token_index"][i]
            ids = batch["input_ids"][i]
            both = batch["region_present"][i] & batch["ref_region_present"][i]
            assert index[2] == -1 and (both | (index < 0)).all() and (index >= 0).any()
            assert (ids != facial).all()
            words = tokenizer.convert_ids_to_tokens(ids[index[index >= 0]].tolist())
            assert {w.removesuffix("</w>") for w in words} <= set(REGION_WORDS)


def test_faceclip_batches_follow_the_contract(built_dataset, decoded):
    batches = take(faceclip_loader(str(built_dataset), config(resampled=False)))
    assert sorted(k for b in batches for k in b["key"]) == sorted(decoded)
    for batch in batches:
        n = len(batch["key"])
        assert batch["ref_face_112"].shape == (n, 3, 112, 112)
        assert batch["pixel_values"].shape == (n, 3, 64, 64)
        assert batch["clip_pixel_values"].shape == (n, 3, 32, 32)
        assert batch["ref_id_embeds"].shape == (n, 128)
        assert batch["original_size"].dtype == batch["crop_top_left"].dtype == torch.long
        assert batch["original_size"].tolist() == [[512, 512]] * n
        assert batch["crop_top_left"].tolist() == [[0, 0]] * n
        for name in ("ref_face_112", "pixel_values"):
            assert batch[name].min() >= -1 and batch[name].max() <= 1
        for i, key in enumerate(batch["key"]):
            target, ref = decoded[key], decoded[batch["ref_key"][i]]
            assert batch["caption"][i] == target.caption
            face = to_unit_range(arcface_crop(ref.image, ref.landmarks), 112)
            assert torch.equal(batch["ref_face_112"][i], face)
            assert torch.equal(batch["clip_pixel_values"][i], clip_preprocess(target.image, 32))


def test_references_are_other_images_of_the_same_identity(epoch, built_dataset, identities):
    seen = Counter()
    for batch in epoch:
        for key, ref, identity, has in zip(
            batch["key"], batch["ref_key"], batch["identity"], batch["has_reference"].tolist(),
            strict=True,
        ):  # fmt: skip
            seen[key] += 1
            row = identities[key]
            assert identity == row["identity"]
            assert has == (row["identity_size"] > 1)
            if has:
                assert ref != key and identities[ref]["identity"] == identity
                assert row["duplicate_of"] != ref and identities[ref]["duplicate_of"] != key
            else:
                assert ref == key
    assert seen == Counter(list(identities))  # a finite pass: every sample once
    unpaired = take(faceclip_loader(str(built_dataset), config(pair_identities=False)), 3)
    assert all(b["ref_key"] == b["key"] and not b["has_reference"].any() for b in unpaired)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches(built_dataset, tokenizer, workers):
    cfg = config(workers=workers)
    first = take(consistentid_loader(str(built_dataset), tokenizer, cfg), 5)
    again = take(consistentid_loader(str(built_dataset), tokenizer, cfg), 5)
    assert_same(first, again)
    other = take(
        consistentid_loader(str(built_dataset), tokenizer, config(workers=workers, seed=8)), 5
    )
    assert keys(other) != keys(first)


@pytest.mark.parametrize("workers", [0, 2])
def test_start_batch_continues_the_fresh_run(built_dataset, workers):
    cfg = config(workers=workers)
    fresh = take(faceclip_loader(str(built_dataset), cfg), 6)
    resumed = take(faceclip_loader(str(built_dataset), cfg, start_batch=3), 3)
    assert_same(resumed, fresh[3:6])


def test_start_batch_in_a_finite_run_with_uneven_workers(built_dataset):
    """Two workers with 8 and 3 samples: the DataLoader goes on with one worker after the
    other runs out, and a resumed run must follow it there."""
    cfg = config(workers=2, resampled=False)
    loader = faceclip_loader(str(built_dataset), cfg)
    schedule = loader.dataset.schedule
    assert schedule.batches(0) != schedule.batches(1)  # uneven on purpose
    fresh = take(loader)
    assert len(fresh) == schedule.batches(0) + schedule.batches(1)
    assert sorted(k for b in fresh for k in b["key"]) == sorted(
        k
        for b in take(faceclip_loader(str(built_dataset), config(resampled=False)))
        for k in b["key"]
    )
    for start in (1, 4, len(fresh) - 1, len(fresh)):
        resumed = take(faceclip_loader(str(built_dataset), cfg, start_batch=start))
        assert keys(resumed) == keys(fresh[start:])


def test_resume_skips_samples_without_decoding_them(built_dataset, monkeypatch):
    decodes = Counter()
    real = loader_module.decode_sample

    def counted(members, key, identity):
        decodes["n"] += 1
        return real(members, key, identity)

    monkeypatch.setattr(loader_module, "decode_sample", counted)
    fresh = take(faceclip_loader(str(built_dataset), config()), 13)
    assert decodes["n"] >= 26  # target and, mostly, a reference for each sample
    decodes.clear()
    # Batch 12 starts 24 samples in: two whole rounds skipped unread, then two raw samples.
    resumed = take(faceclip_loader(str(built_dataset), config(), start_batch=12), 1)
    assert keys(resumed) == keys(fresh[12:13])
    assert decodes["n"] <= 2 * SMALL["batch_size"]  # only the batch it returns


def test_resampled_rounds_cover_every_sample(built_dataset):
    batches = take(faceclip_loader(str(built_dataset), config(shuffle_buffer=20)), 11)
    order = [k for b in batches for k in b["key"]]
    assert Counter(order) == Counter({k: 2 for k in order})  # two rounds of 11 samples
    assert order[:11] != order[11:]  # each round is reshuffled


def test_ranks_read_disjoint_shards(built_dataset, monkeypatch):
    cfg = config(resampled=False, workers=2)
    per_rank = [
        {
            k
            for b in faceclip_loader(str(built_dataset), cfg, rank=r, world_size=2)
            for k in b["key"]
        }
        for r in range(2)
    ]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == 11
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert node_rank() == (1, 2)
    from_env = {k for b in faceclip_loader(str(built_dataset), cfg) for k in b["key"]}
    assert from_env == per_rank[1]
    assert node_rank(rank=0) == (0, 2)
    with pytest.raises(ValueError):
        node_rank(rank=2)


@pytest.mark.slow  # starts a SeaweedFS server
def test_loader_streams_from_object_storage(built_dataset, tokenizer, tmp_path):
    """The same batches from s3:// as from the local folder: streamed shards, ranged
    reference reads and identities.parquet through a real S3 server, in worker processes."""
    from s3_server import BUCKET, point_storage_at, running

    import storage

    cfg = config(workers=2)
    local = take(consistentid_loader(str(built_dataset), tokenizer, cfg), 6)
    with running(tmp_path / "s3") as server, pytest.MonkeyPatch.context() as mp:
        point_storage_at(server, mp)
        url = f"s3://{BUCKET}/dataset"
        for path in sorted(built_dataset.rglob("*")):
            if path.is_file():
                rel = path.relative_to(built_dataset).parts
                storage.atomic_write_bytes(storage.join(url, *rel), path.read_bytes())
        # Spawned, the default: the workers see the credentials set after the fork server began.
        cached = config(workers=2, index_cache=str(tmp_path / "index-cache"), start_method="spawn")
        remote = take(consistentid_loader(url, tokenizer, cached), 6)
        assert_same(remote, local)
        assert list((tmp_path / "index-cache").glob("*.npz"))
        resumed = take(consistentid_loader(url, tokenizer, cached, start_batch=4), 2)
        assert_same(resumed, local[4:6])
