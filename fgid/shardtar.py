"""Shard tars, read as untrusted and written byte-stable: the one place members are parsed.

A shared dataset is input from strangers. Reading one never unpickles or `torch.load`s a member
(every decoder here is named: JPEG/PNG through Pillow limited to those formats, `.npy` without
pickles, UTF-8 text, JSON); a key must have the form our writer makes (`schema.KEY_PATTERN`: no
`/`, `..`, absolute path or NUL); a member larger than `MAX_MEMBER_BYTES` (declared size, which
is the expanded size of a sparse member) is skipped unread; sparse, link and device members are
skipped; an image over `MAX_PIXELS` is refused before it is decoded. A skipped member is logged
with its reason (`SKIP_REASONS`) and handed to `on_skip`, so a caller can count or refuse.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np

import storage
from fgid.schema import KEY_PATTERN

log = logging.getLogger(__name__)

MAX_MEMBER_BYTES = 64 * 2**20  # an aligned face's members are a few hundred KB at most
MAX_PIXELS = 4096 * 4096  # aligned faces are align.size square (512 by default)
IMAGE_FORMATS = ("JPEG", "PNG")  # what the writer produces; Pillow tries nothing else
_KEY = re.compile(KEY_PATTERN)
_EXT = re.compile(r"[a-z0-9_]{1,40}(?:\.[a-z0-9_]{1,40}){0,3}")

SKIP_REASONS = {
    "not_a_file": "a link, device, fifo or folder member",
    "sparse_member": "a sparse member (the writer never makes one)",
    "member_too_large": "declared size above MAX_MEMBER_BYTES",
    "bad_name": "the name is not `{key}.{ext}` with a key of our form",
}

OnSkip = Callable[[str, str], None]  # (member name, reason code)


class UnsafeSample(ValueError):
    """A sample or member refused by a safety rule; `reason` is a code, as in the index."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def is_key(key: object) -> bool:
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def check_key(key: object) -> str:
    """`key` if it has our writer's form, else UnsafeSample("bad_key")."""
    if not is_key(key):
        raise UnsafeSample("bad_key", f"{str(key)[:80]!r} is not a sample key of this format")
    return key  # type: ignore[return-value]


def split_name(name: str) -> tuple[str, str] | None:
    """(key, ext) of a member name of our form, else None. Keys end at the first dot."""
    key, dot, ext = name.partition(".")
    if not dot or not is_key(key) or not _EXT.fullmatch(ext):
        return None
    return key, ext


def _skip(name: str, reason: str, on_skip: OnSkip | None) -> None:
    log.warning("skipped tar member %r: %s", name[:200], reason)
    if on_skip is not None:
        on_skip(name, reason)


def member_skip_reason(info: tarfile.TarInfo, max_bytes: int = MAX_MEMBER_BYTES) -> str | None:
    """Why `info` must not be read, or None when it may."""
    if info.issparse():
        return "sparse_member"
    if not info.isreg():
        return "not_a_file"
    if info.size > max_bytes:
        return "member_too_large"
    if split_name(info.name) is None:
        return "bad_name"
    return None


def iter_members(
    tar: tarfile.TarFile, *, max_bytes: int = MAX_MEMBER_BYTES, on_skip: OnSkip | None = None
) -> Iterator[tuple[str, str, bytes]]:
    """(key, ext, data) per safe member, in tar order; works on streamed (`r|`) tars."""
    for info in tar:
        reason = member_skip_reason(info, max_bytes)
        if reason is not None:
            _skip(info.name, reason, on_skip)
            continue
        key, ext = split_name(info.name)  # type: ignore[misc]
        handle = tar.extractfile(info)
        data = handle.read(max_bytes + 1) if handle is not None else b""
        if len(data) > max_bytes:  # a header that lied about its size
            _skip(info.name, "member_too_large", on_skip)
            continue
        yield key, ext, data


def iter_samples(
    tar: tarfile.TarFile, *, max_bytes: int = MAX_MEMBER_BYTES, on_skip: OnSkip | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: data}) per sample, members in tar order (a sample's members are adjacent)."""
    key, members = None, {}
    for this, ext, data in iter_members(tar, max_bytes=max_bytes, on_skip=on_skip):
        if this != key and members:
            yield key, members  # type: ignore[misc]
            members = {}
        key = this
        members[ext] = data
    if members:
        yield key, members  # type: ignore[misc]


@contextlib.contextmanager
def open_samples(
    url: str, *, on_skip: OnSkip | None = None
) -> Iterator[Iterator[tuple[str, dict[str, bytes]]]]:
    """The samples of the shard tar at `url`, streamed (one sample in memory at a time)."""
    with storage.open_input(url) as source, tarfile.open(fileobj=source, mode="r|") as tar:
        yield iter_samples(tar, on_skip=on_skip)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one member with fixed headers (mtime 0, mode 0644, no owner), so that a shard
    written twice, or rewritten by a caption run or a takedown, is byte-identical."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> int:
    """Append a sample's members in the given order; returns their data bytes."""
    for ext, data in members.items():
        add_member(tar, f"{key}.{ext}", data)
    return sum(len(d) for d in members.values())


def new_tar(handle: BinaryIO) -> tarfile.TarFile:
    return tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT)


@contextlib.contextmanager
def rewrite_tar(
    url: str, *, on_skip: OnSkip | None = None
) -> Iterator[tuple[Iterator[tuple[str, dict[str, bytes]]], tarfile.TarFile]]:
    """(old samples, new tar): stream the shard tar at `url` and write its replacement, which
    takes the old one's place atomically only if the block succeeds. Members a reader must skip
    are not carried over."""
    with (
        open_samples(url, on_skip=on_skip) as samples,
        storage.atomic_open(url) as target,
        new_tar(target) as new,
    ):
        yield samples, new


# Named decoders: the only ways a member's bytes become values.


def image_size(data: bytes, formats: tuple[str, ...] = IMAGE_FORMATS) -> tuple[int, int]:
    """(width, height) from the header; UnsafeSample over MAX_PIXELS or in another format."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=list(formats)) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:  # Pillow's own, higher cap
        raise UnsafeSample("too_large", str(error)) from None
    except (UnidentifiedImageError, OSError) as error:
        raise UnsafeSample("not_an_image", f"not {'/'.join(formats)}: {error}") from None
    if width * height > MAX_PIXELS:
        raise UnsafeSample("too_large", f"{width}x{height} pixels, above {MAX_PIXELS}")
    return width, height


def decode_rgb(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB, as webdataset's "rgb8" (PIL), after the format and pixel checks."""
    from PIL import Image

    image_size(data)
    with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as image:
        return np.asarray(image.convert("RGB"))


def decode_label_map(data: bytes) -> np.ndarray:
    """(H, W) uint8 class ids of a PNG label map, after the format and pixel checks."""
    from PIL import Image

    image_size(data, ("PNG",))
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        return np.asarray(image.convert("L") if image.mode not in ("L", "P") else image).astype(
            np.uint8
        )


def decode_embedding(data: bytes) -> np.ndarray:
    """A float32 vector from `.npy` bytes; pickled arrays are refused, never loaded."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise UnsafeSample("bad_member", f"id.npy: {error}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.size > 65536:
        raise UnsafeSample("bad_member", "id.npy is not a small numeric array")
    return array.astype(np.float32).reshape(-1)


def decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def decode_meta(data: bytes) -> dict:
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnsafeSample("bad_member", f"json: {error}") from None
    if not isinstance(meta, dict):
        raise UnsafeSample("bad_member", "json is not an object")
    return meta


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
