"""Atomic writes: a reader never sees a partial file or object.

Local: write beside the target, fsync, rename. Object stores: spool to a local temporary file and
upload it in one operation; S3 makes an object (single PUT or completed multipart upload) visible
only once it is whole, so there is no partial object to see.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from storage.files import filesystem, is_remote

TMP_MARK = ".tmp-"
# A temporary file of a writer on another host is left alone until it is this old: its pid
# cannot be checked from here, and a live writer finishes a file well within a day.
FOREIGN_TMP_SECONDS = 24 * 3600


def tmp_name(path: Path) -> Path:
    # Host and pid name the writer, so cleanup can tell a live writer's file from a dead one's;
    # the dot prefix hides the file from listings.
    return path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _tmp_owner(name: str) -> tuple[str | None, int | None]:
    """(host, pid) from a temporary name; host None for names written before hosts were in it."""
    tail = name.rsplit(TMP_MARK, 1)[-1]
    host, _, pid = tail.rpartition("-")
    return (host or None), (int(pid) if pid.isdigit() else None)


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
    """Delete temporaries left by dead local writers; returns how many were removed.

    A file whose writer is alive on this host is never touched, nor one of another host until it
    is FOREIGN_TMP_SECONDS old. Object stores never hold temporaries (uploads are spooled
    locally): nothing to do there."""
    if is_remote(folder):
        return 0
    here, removed = socket.gethostname(), 0
    for stale in Path(folder).glob(f".*{TMP_MARK}*"):
        host, pid = _tmp_owner(stale.name)
        if host in (None, here):
            if pid is not None and pid_alive(pid):
                continue
        else:
            try:
                if time.time() - stale.stat().st_mtime < FOREIGN_TMP_SECONDS:
                    continue
            except FileNotFoundError:
                continue
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
