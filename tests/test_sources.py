"""Archives, webdataset shards and Parquet image datasets as inputs: listed and read in place,
hostile names and sizes refused, provenance kept; shards on a real S3 server too."""

from __future__ import annotations

import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from s3_server import BUCKET, point_storage_at, running

import storage
from fgid.inputs import InputError, collect_entries, expand_braces, plan_shards
from fgid.pipeline import build
from fgid.sources import Unusable, read_member
from fgid.stages.decode import Rejected, read_source
from tests.corpus import jpeg_bytes, png_bytes
from tests.photos import astronaut, grace_hopper

CAP = 8 << 20


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {"astronaut": jpeg_bytes(astronaut()), "hopper": grace_hopper().read_bytes()}


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
        **fields) -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    for field, value in fields.items():
        setattr(info, field, value)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_shard(path: Path, photos: dict[str, bytes], prefix: str = "") -> Path:
    """A webdataset shard as img2dataset writes one: jpg, txt caption, json fields, cls label."""
    with tarfile.open(path, "w") as tar:
        for i, (name, data) in enumerate(sorted(photos.items())):
            key = f"{prefix}{i:09d}"
            add(tar, f"{key}.jpg", data)
            add(tar, f"{key}.txt", f"a photo of {name}".encode())
            fields = {"url": f"https://example.com/{name}.jpg", "license": "cc0", "width": 512}
            add(tar, f"{key}.json", json.dumps(fields).encode())
            add(tar, f"{key}.cls", name.encode())
    return path


def test_a_webdataset_shard_gives_its_images_with_their_sidecars(tmp_path, photos):
    shard = write_shard(tmp_path / "shard-000.tar", photos)
    entries = collect_entries([str(shard)])
    assert [e.source for e in entries] == [f"{shard}#000000000.jpg", f"{shard}#000000001.jpg"]
    first = entries[0]
    assert (first.caption, first.label, first.license, first.url) == (
        "a photo of astronaut", "astronaut", "cc0", "https://example.com/astronaut.jpg"
    )  # fmt: skip
    assert json.loads(first.extra)["width"] == 512
    assert read_member(first.source, CAP) == photos["astronaut"]
    assert read_source(entries[1].source, CAP) == photos["hopper"]


def test_brace_patterns_and_lists_name_many_shards(tmp_path, photos):
    for i in range(3):
        write_shard(tmp_path / f"shard-{i:03d}.tar", photos, prefix=f"s{i}-")
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    found = plan_shards([str(tmp_path / "shard-{000..002}.tar")], 100)
    assert sum(len(p.items) for p in found) == 6
    listed = plan_shards([str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-002.tar")], 100)
    assert sum(len(p.items) for p in listed) == 4
    with pytest.raises(InputError, match="input not found"):
        plan_shards([str(tmp_path / "shard-{000..003}.tar")], 100)


def test_hostile_tar_members_are_never_planned_or_read(tmp_path, photos):
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "ok.jpg", photos["astronaut"])
        add(tar, "../escape.jpg", photos["astronaut"])
        add(tar, "/etc/absolute.jpg", photos["astronaut"])
        add(tar, "odd#name.jpg", photos["astronaut"])
        add(tar, "control\x07.jpg", photos["astronaut"])
        add(tar, "link.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, "hard.jpg", kind=tarfile.LNKTYPE, linkname="ok.jpg")
        add(tar, "fifo.jpg", kind=tarfile.FIFOTYPE)
        add(tar, "dev.jpg", kind=tarfile.CHRTYPE, devmajor=1, devminor=5)
        add(tar, "big.jpg", b"\xff" * 4096)
    sources = [e.source for e in collect_entries([str(shard)])]
    assert sources == [f"{shard}#big.jpg", f"{shard}#ok.jpg"]
    with pytest.raises(Unusable, match="4096 bytes > 1000") as caught:
        read_member(f"{shard}#big.jpg", 1000)
    assert caught.value.code == "file_too_large"
    for name in ("../escape.jpg", "link.jpg", "fifo.jpg", "nothing.jpg"):
        with pytest.raises(Rejected) as caught:
            read_source(f"{shard}#{name}", CAP)
        assert caught.value.code == "unreadable"


def test_zip_archives_are_read_in_place_with_caps(tmp_path, photos):
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("img/00001.jpg", photos["astronaut"])
        zf.writestr("img/00002.png", png_bytes(astronaut()[:100, :100]))
        zf.writestr("img/00002.txt", "a crop")
        zf.writestr("../evil.jpg", photos["astronaut"])
        zf.writestr("bomb.jpg", b"\0" * (20 << 20))  # 20 MiB of zeros, a few KB deflated
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("img/", "")
    assert archive.stat().st_size < 1 << 20
    entries = {e.source.rpartition("#")[2]: e for e in collect_entries([str(archive)])}
    assert sorted(entries) == ["bomb.jpg", "img/00001.jpg", "img/00002.png"]
    assert entries["img/00002.png"].caption == "a crop"
    assert read_source(f"{archive}#img/00001.jpg", CAP) == photos["astronaut"]
    with pytest.raises(Rejected) as caught:
        read_source(f"{archive}#bomb.jpg", CAP)
    assert caught.value.code == "file_too_large"
    before = list(tmp_path.iterdir())
    assert list(tmp_path.iterdir()) == before  # nothing was extracted


def test_compressed_tars_are_refused_with_a_hint(tmp_path, photos):
    archive = tmp_path / "faces.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add(tar, "a.jpg", photos["astronaut"])
    with pytest.raises(InputError, match="compressed tar cannot be read in place"):
        plan_shards([str(archive)], 10)


def hf_parquet(path: Path, photos: dict[str, bytes]) -> Path:
    """A Parquet file as the `datasets` library writes an Image column."""
    import datasets

    names = sorted(photos)
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": photos[n], "path": f"{n}.jpg"} for n in names],
            "caption": [f"a photo of {n}" for n in names],
            "person": names,
        }
    ).cast_column("image", datasets.Image())
    ds.to_parquet(str(path))
    return path


def test_a_parquet_image_dataset_gives_one_source_per_row(tmp_path, photos, lite_config):
    table = hf_parquet(tmp_path / "train.parquet", photos)
    columns = lite_config.inputs.model_copy(
        update={"caption_column": "caption", "label_column": "person"}
    )
    [plan] = plan_shards([str(table)], 10, columns=columns)
    assert [it.source for it in plan.items] == [f"{table}#image/0", f"{table}#image/1"]
    assert [it.label for it in plan.items] == ["astronaut", "hopper"]
    assert json.loads(plan.items[1].extra) == {"path": "hopper.jpg"}
    assert read_source(plan.items[1].source, CAP) == photos["hopper"]
    for member, code in (("image/7", "unreadable"), ("nope/0", "unreadable")):
        with pytest.raises(Rejected) as caught:
            read_source(f"{table}#{member}", CAP)
        assert caught.value.code == code


def test_archives_shards_and_parquet_build_with_their_provenance(
    tmp_path, photos, lite_config, lite_models
):
    shard = write_shard(tmp_path / "shard-000.tar", photos)
    table = hf_parquet(tmp_path / "train.parquet", photos)
    config = lite_config.model_copy(
        update={"inputs": lite_config.inputs.model_copy(update={"caption_column": "caption"})}
    )
    out = tmp_path / "ds"
    summary = build([str(shard), str(table)], str(out), config, lite_models)
    assert summary["inputs"]["planned"] == 4
    from fgid.dataset import Dataset

    rows = {r["source"]: r for r in Dataset(str(out)).index().to_pylist()}
    first = rows[f"{shard}#000000000.jpg"]
    assert first["status"] == "ok" and first["label"] == "astronaut"
    assert (first["source_caption"], first["source_license"], first["source_url"]) == (
        "a photo of astronaut", "cc0", "https://example.com/astronaut.jpg"
    )  # fmt: skip
    assert rows[f"{table}#image/1"]["source_caption"] == "a photo of hopper"
    assert sum(r["status"] == "ok" for r in rows.values()) == 4


def test_webdataset_shards_on_s3_are_inputs(tmp_path, photos):
    with running(tmp_path / "s3") as server, pytest.MonkeyPatch.context() as mp:
        point_storage_at(server, mp)
        for i in range(2):
            local = write_shard(tmp_path / f"shard-{i:03d}.tar", photos, prefix=f"s{i}-")
            fs, _ = storage.filesystem(f"s3://{BUCKET}/x")
            fs.put_file(str(local), f"{BUCKET}/shards/{local.name}")
        pattern = f"s3://{BUCKET}/shards/shard-{{000..001}}.tar"
        entries = collect_entries([pattern])
        assert len(entries) == 4
        assert entries[0].source == f"s3://{BUCKET}/shards/shard-000.tar#s0-000000000.jpg"
        assert entries[0].caption == "a photo of astronaut"
        assert read_source(entries[3].source, CAP) == photos["hopper"]
