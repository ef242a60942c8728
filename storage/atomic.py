"""Atomic writes: a reader never sees a partial file or object.

Local: write beside the target, fsync, rename. Object stores: spool to a local temporary file and
upload it in one operation; S3 makes an object (single PUT or completed multipart upload) visible
only once it is whole, so there is no partial object to see.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from storage.files import filesystem, is_remote

TMP_MARK = ".tmp-"


def tmp_name(path: Path) -> Path:
    # The pid keeps two writers apart; the dot prefix hides the file from listings.
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_open(url: str | Path) -> Iterator[BinaryIO]:
    """Open `url` for binary writing; it appears under its name only if the block succeeds."""
    if is_remote(url):
        with _spooled_upload(str(url)) as handle:
            yield handle
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _spooled_upload(url: str) -> Iterator[BinaryIO]:
    fs, path = filesystem(url)
    with tempfile.NamedTemporaryFile(prefix="fgid-upload-", suffix=".part") as spool:
        yield spool
        spool.flush()
        fs.put_file(spool.name, path)


def atomic_write_bytes(url: str | Path, data: bytes) -> None:
    with atomic_open(url) as handle:
        handle.write(data)


def atomic_write_text(url: str | Path, text: str) -> None:
    atomic_write_bytes(url, text.encode("utf-8"))


def remove_stale_tmp(folder: str | Path) -> int:
    """Delete temporaries left by a killed local writer; returns how many were removed.

    Object stores never hold temporaries (uploads are spooled locally): nothing to do there."""
    if is_remote(folder):
        return 0
    removed = 0
    for stale in Path(folder).glob(f".*{TMP_MARK}*"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
