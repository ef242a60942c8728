"""A hostile copy of a built dataset: what an attacker could put in a shared shard.

Shard 0's tar keeps its real samples and gains, around them: pickled members (`.pyd`, `.pickle`,
`.pth`) that create `marker` if anything unpickles them, a GNU sparse member declaring 1.5 GB, a
real member one byte over the member cap, a JPEG whose header declares 16000x16000 pixels and a
PNG that inflates to 16000x16000, keys with `..`, an absolute path and 200 characters, and
symlink, hardlink, character-device and fifo members. `poison_identities` adds traversal and
absolute keys to identities.parquet.
"""

from __future__ import annotations

import builtins
import io
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fgid.shardtar import MAX_MEMBER_BYTES, iter_samples

SPARSE_BYTES = 1500 * 2**20
BOMB_SIDE = 16000


class RunsCode:
    """Unpickling this creates the marker file: proof that something unpickled a member."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def pickled(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(RunsCode(marker))


def jpeg_bomb(jpg: bytes, side: int = BOMB_SIDE) -> bytes:
    """A real JPEG whose frame header claims side x side pixels (a decoder would allocate them)."""
    data = bytearray(jpg)
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):  # start of frame: precision, height, width
            data[i + 5 : i + 9] = struct.pack(">HH", side, side)
            return bytes(data)
        i += 2 + length
    raise ValueError("no frame header")


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A small PNG of a side x side 8-bit grey image of zeros (256 MB once decoded)."""
    row = b"\x00" + b"\x00" * side
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def _sparse_part(work: Path, name: str) -> bytes:
    """A GNU tar holding one sparse member `name` of SPARSE_BYTES, without its end blocks."""
    work.mkdir(parents=True, exist_ok=True)
    big = work / name
    with open(big, "wb") as handle:
        handle.truncate(SPARSE_BYTES)
    archive = work / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(archive), "-C", str(work), name], check=True)
    big.unlink()
    data = archive.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.getmembers()
        return data[: tar.offset]


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def hostile_tar(original: bytes, marker: Path, outside: Path, work: Path) -> bytes:
    """The original shard's samples with every kind of hostile member around them."""
    with tarfile.open(fileobj=io.BytesIO(original), mode="r:") as tar:
        samples = list(iter_samples(tar))
    (first_key, first), rest = samples[0], samples[1:]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for ext, data in first.items():
            _add(tar, f"{first_key}.{ext}", data)
        for ext in ("pyd", "pickle", "pth"):  # webdataset's defaults unpickle / torch.load these
            _add(tar, f"{first_key}.{ext}", pickled(marker))
        _add(tar, "../../outside/k0.jpg", first["jpg"])
        _add(tar, f"{outside}/k1.jpg", first["jpg"])
        _add(tar, "a" * 200 + ".jpg", first["jpg"])
        _add(tar, "k3.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tar, "k4.jpg", type=tarfile.LNKTYPE, linkname=f"{first_key}.jpg")
        _add(tar, "k5.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        _add(tar, "k6.jpg", type=tarfile.FIFOTYPE)
        _add(tar, "k7.jpg", b"\0" * (MAX_MEMBER_BYTES + 1))
        bomb = dict(first, jpg=jpeg_bomb(first["jpg"]))
        bomb["mask.png"] = png_bomb()
        for ext, data in bomb.items():
            _add(tar, f"bomb0.{ext}", data)
        for key, members in rest:
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)
    return _sparse_part(work, "k8.jpg") + out.getvalue()


def hostile_dataset(built: Path, target: Path, marker: Path, outside: Path) -> Path:
    """A copy of the finished build `built` whose shard 0 tar is hostile; returns `target`."""
    shutil.copytree(built, target)
    shard = target / "shards" / "00000.tar"
    shard.write_bytes(hostile_tar(shard.read_bytes(), marker, outside, target.parent / "work"))
    return target


def poison_identities(dataset: Path, outside: Path) -> None:
    """identities.parquet with a traversal key and an absolute one among the real rows."""
    path = dataset / "identities.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    for key in ("../../../outside/k0", f"{outside}/k1"):
        rows.append({**rows[0], "key": key, "identity": "cluster-evil", "duplicate_of": None})
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
