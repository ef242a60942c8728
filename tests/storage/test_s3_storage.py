"""The storage layer against a real S3-compatible server (SeaweedFS) on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from s3_server import BUCKET

import storage
from fgid.inputs import collect_sources
from fgid.stages.decode import Rejected, read_source

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def prefix(s3_env):
    """A fresh s3:// folder for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def objects(prefix: str) -> list[str]:
    return [storage.name(u) for u in storage.walk_files(prefix)]


def test_join_and_name_on_urls_and_paths(tmp_path):
    assert storage.join("s3://b/ds/", "shards", "00000.tar") == "s3://b/ds/shards/00000.tar"
    assert storage.join(tmp_path, "a") == str(tmp_path / "a")
    assert storage.name("s3://b/ds/") == storage.name("s3://b/ds") == "ds"
    assert storage.name(tmp_path / "ds") == "ds"
    assert storage.is_remote("s3://b/k") and not storage.is_remote(tmp_path)


@pytest.mark.parametrize(
    "url", ["s3://AKIA:topsecret@bucket/ds", "s3://bucket/ds?X-Amz-Credential=a&X-Amz-Signature=b"]
)
def test_urls_with_credentials_are_refused_without_repeating_them(url):
    with pytest.raises(ValueError, match="embedded credentials") as caught:
        storage.exists(url)
    assert "topsecret" not in str(caught.value) and "X-Amz" not in str(caught.value)


def test_write_read_exists_list_remove(prefix):
    storage.atomic_write_text(storage.join(prefix, "a.json"), "{}")
    storage.atomic_write_bytes(storage.join(prefix, "shards", "00001.tar"), b"tar1")
    storage.atomic_write_bytes(storage.join(prefix, "shards", "00000.tar"), b"tar0")
    storage.atomic_write_bytes(storage.join(prefix, "shards", "00000.stats.json"), b"{}")
    storage.atomic_write_bytes(storage.join(prefix, "shards", ".hidden.tar"), b"x")
    storage.atomic_write_bytes(storage.join(prefix, "shards", "deeper", "00002.tar"), b"x")
    shards = storage.join(prefix, "shards")

    assert storage.list_files(shards, "[0-9]*.tar") == [
        f"{prefix}/shards/00000.tar",
        f"{prefix}/shards/00001.tar",
    ]  # sorted, URLs as given, hidden files and deeper folders left out
    assert storage.list_files(storage.join(prefix, "nothing-here")) == []
    assert storage.exists(storage.join(prefix, "a.json"))
    assert not storage.exists(storage.join(prefix, "b.json"))
    assert storage.is_dir(shards) and not storage.is_dir(storage.join(prefix, "a.json"))
    assert storage.read_text(storage.join(prefix, "a.json")) == "{}"
    assert storage.size(storage.join(shards, "00001.tar")) == 4
    with storage.open_input(storage.join(shards, "00000.tar")) as handle:
        assert handle.read() == b"tar0"
    assert len(storage.walk_files(prefix)) == 6
    storage.remove(storage.join(shards, "00001.tar"))
    storage.remove(storage.join(shards, "00001.tar"))  # already gone: fine
    assert not storage.exists(storage.join(shards, "00001.tar"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(shards, "00001.tar"))


def test_an_object_appears_only_when_its_writer_finishes(prefix):
    url = storage.join(prefix, "big.bin")
    with storage.atomic_open(url) as handle:
        handle.write(b"x" * 1_000_000)
        assert not storage.exists(url)  # nothing is uploaded while the writer runs
    assert storage.read_bytes(url) == b"x" * 1_000_000


def test_a_writer_that_fails_midway_leaves_no_object_and_keeps_the_old_one(prefix):
    new, old = storage.join(prefix, "new.tar"), storage.join(prefix, "old.tar")
    storage.atomic_write_bytes(old, b"complete")
    for url in (new, old):
        with pytest.raises(RuntimeError, match="disk on fire"), storage.atomic_open(url) as h:
            h.write(b"partial" * 1000)
            raise RuntimeError("disk on fire")
    assert not storage.exists(new)
    assert storage.read_bytes(old) == b"complete"
    assert objects(prefix) == ["old.tar"]
    assert storage.remove_stale_tmp(prefix) == 0  # temporaries never reach the bucket


def test_credentials_come_from_the_environment(prefix, monkeypatch):
    storage.atomic_write_text(storage.join(prefix, "a.txt"), "hi")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PermissionError):
        storage.read_text(storage.join(prefix, "a.txt"))


def test_inputs_from_a_prefix_a_list_object_and_single_objects(prefix, tmp_path):
    for key in ("photos/b.jpg", "photos/a.PNG", "photos/sub/c.jpeg", "photos/.DS_Store",
                "photos/notes.md", "one.jpg"):  # fmt: skip
        storage.atomic_write_bytes(storage.join(prefix, key), b"img")
    storage.atomic_write_text(
        storage.join(prefix, "lists", "more.txt"),
        f"# comment\n../one.jpg\n{tmp_path / 'local.jpg'}\n{prefix}/photos/b.jpg\n",
    )
    local_list = tmp_path / "local.txt"
    local_list.write_text(f"{prefix}/missing.jpg\n")

    found = collect_sources(
        [f"{prefix}/photos/", f"{prefix}/lists/more.txt", f"{prefix}/one.jpg", str(local_list)]
    )
    assert found == sorted(
        [
            f"{prefix}/missing.jpg",
            f"{prefix}/one.jpg",
            f"{prefix}/photos/a.PNG",
            f"{prefix}/photos/b.jpg",
            f"{prefix}/photos/sub/c.jpeg",
            str(tmp_path / "local.jpg"),
        ]
    )
    # A missing object in a bucket is a row; a bucket that does not exist is a typo.
    assert collect_sources([f"{prefix}/nope.jpg"]) == [f"{prefix}/nope.jpg"]
    with pytest.raises(FileNotFoundError):
        collect_sources(["s3://no-such-bucket-fgid/x.jpg"])


def test_read_source_keeps_its_rejection_codes_for_objects(prefix):
    storage.atomic_write_bytes(storage.join(prefix, "ok.jpg"), b"x" * 100)
    storage.atomic_write_bytes(storage.join(prefix, "empty.jpg"), b"")
    storage.atomic_write_bytes(storage.join(prefix, "folder", "inside.jpg"), b"x")
    assert read_source(storage.join(prefix, "ok.jpg"), max_bytes=100) == b"x" * 100
    for key, code in [
        ("ok.jpg", "file_too_large"),
        ("empty.jpg", "empty_file"),
        ("missing.jpg", "unreadable"),
        ("folder", "unreadable"),
    ]:
        with pytest.raises(Rejected) as caught:
            read_source(storage.join(prefix, key), max_bytes=99)
        assert caught.value.code == code, key


def test_read_source_raises_when_the_server_is_down(prefix, monkeypatch):
    """An outage is the shard's failure (retried), never an input rejected as unreadable."""
    from prefect_server import free_port

    monkeypatch.setenv("FGID_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(Exception) as caught:
        read_source(storage.join(prefix, "ok.jpg"), max_bytes=100)
    assert not isinstance(caught.value, Rejected)


@pytest.mark.slow
def test_webdataset_opens_s3_urls_in_a_fresh_interpreter(prefix, s3_env):
    """A spawned DataLoader worker unpickles the dataset without importing training.stream."""
    import io
    import pickle
    import tarfile

    from training.stream import webdataset

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key in ("k1", "k2"):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 2
            tar.addfile(info, io.BytesIO(key.encode()))
    storage.atomic_write_bytes(storage.join(prefix, "shards", "00000.tar"), buffer.getvalue())
    storage.atomic_write_text(storage.join(prefix, "shards", "00000.stats.json"), "{}")
    storage.atomic_write_bytes(storage.join(prefix, "shards", "00001.tar"), b"unfinished")

    dataset = webdataset(prefix)
    assert [s["__key__"] for s in dataset] == ["k1", "k2"]  # 00001 has no stats: not listed
    code = (
        "import pickle, sys; ds = pickle.loads(sys.stdin.buffer.read());"
        "print(sorted(s['__key__'] for s in ds))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(dataset),
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip() == "['k1', 'k2']"


def test_parquet_objects_reach_pyarrow_without_python_file_objects(prefix, monkeypatch):
    """A small object is copied into Arrow's memory (a scan's late teardown then needs no GIL
    at interpreter exit); one over the limit stays a file object, read the same way."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage import files

    table = pa.table({"key": [f"k{i}" for i in range(1000)], "n": list(range(1000))})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    url = storage.join(prefix, "index.parquet")
    storage.atomic_write_bytes(url, sink.getvalue())
    with storage.open_for_arrow(url) as handle:
        assert isinstance(handle, pa.BufferReader)
        assert pq.read_table(handle).equals(table)
    monkeypatch.setattr(files, "ARROW_IN_MEMORY_MAX", 100)
    with storage.open_for_arrow(url) as handle:
        assert not isinstance(handle, pa.NativeFile)
        assert pq.read_table(handle).equals(table)
