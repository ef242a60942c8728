"""Decoded samples, identity pairing, random access into shard tars and load_references."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from training.pairs import IdentityTable
from training.reference import Reference, decode_sample, load_references
from training.stream import shard_urls, webdataset
from training.tarindex import ShardReader, TarIndex


@pytest.fixture(scope="module")
def raw_samples(built_dataset):
    """Every sample as webdataset streams it: key -> {ext: bytes}."""
    return {
        raw["__key__"]: {k: v for k, v in raw.items() if not k.startswith("__")}
        for raw in webdataset(str(built_dataset))
    }


@pytest.fixture(scope="module")
def identity_rows(built_dataset):
    return {r["key"]: r for r in pq.read_table(built_dataset / "identities.parquet").to_pylist()}


def test_decode_sample(raw_samples):
    key, members = next(iter(raw_samples.items()))
    ref = decode_sample(members, key, "someone")
    meta = json.loads(members["json"])
    size = meta["aligned"]["size"]
    assert ref.image.shape == (size, size, 3) and ref.image.dtype == np.uint8
    assert ref.label_map.shape == (size, size) and ref.label_map.dtype == np.uint8
    assert ref.embedding.shape == (meta["embedding"]["dim"],) and ref.embedding.dtype == np.float32
    assert ref.landmarks.shape == (5, 2) and ref.landmarks.dtype == np.float32
    assert ref.caption == members["caption.txt"].decode() and ref.gender == meta["gender"]
    # Landmarks are in aligned pixels: this parser paints the eyes around them.
    for x, y in ref.landmarks[:2]:
        assert ref.label_map[round(y), round(x)] in (4, 5)
    assert ref.landmarks.min() > 0 and ref.landmarks.max() < size
    # The reference trainer's rule for a face without an embedding: zeros of its size.
    without = decode_sample({k: v for k, v in members.items() if k != "id.npy"}, key, "-")
    assert np.array_equal(without.embedding, np.zeros(meta["embedding"]["dim"], np.float32))


def test_tar_index_reads_what_the_stream_reads(built_dataset, raw_samples):
    reader = ShardReader()
    seen = 0
    for url in shard_urls(str(built_dataset)):
        index = reader.index(url)
        assert list(index.keys) == sorted(index.keys)
        for key in index.keys:
            assert reader.read(url, str(key)) == raw_samples[key]
            seen += 1
        with pytest.raises(KeyError):
            index.read("no-such-key")
    assert seen == len(raw_samples) == 11


def test_tar_index_on_remote_storage(built_dataset, raw_samples):
    """fsspec's in-memory file system stands in for object storage: the remote code path
    (read-ahead scan, cat_file ranges) with no server."""
    fs = fsspec.filesystem("memory")
    local = shard_urls(str(built_dataset))[1]
    fs.pipe_file("/tarindex-test/00001.tar", Path(local).read_bytes())
    index = TarIndex.scan("memory://tarindex-test/00001.tar")
    assert np.array_equal(index.keys, TarIndex.scan(local).keys)
    assert np.array_equal(index.starts, TarIndex.scan(local).starts)
    for key in index.keys:
        assert index.read(str(key)) == raw_samples[key]


def test_reader_rescans_a_rewritten_tar(built_dataset, raw_samples, tmp_path, caplog):
    """A caption run rewrites tars in place: members move, the stale index must not be used."""
    import tarfile

    from fgid.shardtar import add_member

    source = shard_urls(str(built_dataset))[0]
    url = str(tmp_path / "00000.tar")
    Path(url).write_bytes(Path(source).read_bytes())
    reader = ShardReader()
    keys = [str(k) for k in reader.index(url).keys]
    with tarfile.open(source) as old, tarfile.open(url, "w", format=tarfile.USTAR_FORMAT) as new:
        for info in old:
            data = old.extractfile(info).read()
            if info.name.endswith(".caption.txt"):
                data = b"A much longer caption than before. " * 20
            add_member(new, info.name, data)
    with caplog.at_level("INFO", logger="training.tarindex"):
        for key in keys:
            got = reader.read(url, key)
            assert got["caption.txt"].startswith(b"A much longer caption")
            assert got["jpg"] == raw_samples[key]["jpg"]
    assert sum("rescanning" in r.message for r in caplog.records) == 1  # once, then fresh


def test_index_cache_is_shared_and_follows_rewrites(
    built_dataset, raw_samples, tmp_path, monkeypatch
):
    url = str(tmp_path / "00001.tar")
    Path(url).write_bytes(Path(shard_urls(str(built_dataset))[1]).read_bytes())
    cache = tmp_path / "index-cache"
    first = ShardReader(cache)
    keys = [str(k) for k in first.index(url).keys]
    assert len(list(cache.glob("*.npz"))) == 1
    # Another process (a worker, a resumed run) reads from the cache without scanning.
    scans = []
    real_scan = TarIndex.scan
    monkeypatch.setattr(TarIndex, "scan", lambda u: scans.append(u) or real_scan(u))
    second = ShardReader(cache)
    assert [second.read(url, k) for k in keys] == [raw_samples[k] for k in keys]
    assert scans == []
    # A rewritten tar (another size and time) has another cache entry: scanned afresh.
    Path(url).write_bytes(Path(shard_urls(str(built_dataset))[0]).read_bytes())
    third = ShardReader(cache)
    fresh_keys = [str(k) for k in third.index(url).keys]
    assert scans == [url] and set(fresh_keys).isdisjoint(keys)
    assert third.read(url, fresh_keys[0]) == raw_samples[fresh_keys[0]]
    assert len(list(cache.glob("*.npz"))) == 2


def test_identity_pairing(built_dataset, identity_rows):
    table = IdentityTable.read(str(built_dataset))
    assert len(table) == 11
    sizes = Counter(r["identity_size"] for r in identity_rows.values())
    assert sizes == {4: 8, 1: 3}
    copies = {k: r["duplicate_of"] for k, r in identity_rows.items() if r["duplicate_of"]}
    assert copies  # the build has an exact copy, which must never pair with its original
    for key, row in identity_rows.items():
        assert table.identity_of(key) == row["identity"]
        picks = set()
        for seed in range(4):
            for round_ in range(6):
                found = table.reference(key, seed, round_)
                assert found == table.reference(key, seed, round_)  # deterministic
                if row["identity_size"] == 1:
                    assert found is None
                    continue
                ref, shard = found
                assert ref != key and identity_rows[ref]["identity"] == row["identity"]
                assert shard == identity_rows[ref]["shard"]
                assert identity_rows[ref]["duplicate_of"] is None  # originals only, here
                assert copies.get(key) != ref and copies.get(ref) != key
                picks.add(ref)
        if row["identity_size"] == 4:
            assert len(picks) >= 2  # the seed and round matter
    assert table.reference("not-a-key", 0) is None and table.identity_of("not-a-key") is None


def test_load_references_one_per_identity(built_dataset, identity_rows):
    refs = load_references(str(built_dataset))
    identities = sorted({r["identity"] for r in identity_rows.values()})
    assert [r.identity for r in refs] == identities
    for ref in refs:
        assert isinstance(ref, Reference)
        row = identity_rows[ref.key]
        assert row["identity"] == ref.identity and row["duplicate_of"] is None
        assert ref.image.shape[2] == 3 and ref.embedding.shape == (128,)
    again = load_references(str(built_dataset))
    assert [r.key for r in again] == [r.key for r in refs]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, refs, strict=True))
    picks = defaultdict(set)
    for seed in range(6):
        for ref in load_references(str(built_dataset), seed=seed):
            picks[ref.identity].add(ref.key)
    assert max(len(keys) for keys in picks.values()) >= 2  # the seed chooses the image
    two = load_references(str(built_dataset), identities=2, seed=3)
    assert len(two) == 2 and {r.identity for r in two} <= set(identities)
    assert load_references(str(built_dataset), identities=0) == []
    with pytest.raises(ValueError):
        load_references(str(built_dataset), identities=-1)


def test_load_references_needs_a_finalized_build(built_dataset, tmp_path):
    import shutil

    copy = tmp_path / "unfinalized"
    shutil.copytree(built_dataset / "shards", copy / "shards")
    with pytest.raises(FileNotFoundError, match="identities.parquet"):
        load_references(str(copy))
