"""Bounded reads of local files: only regular files are opened, never more than asked is read."""

from __future__ import annotations

import os
import stat

CHUNK = 1 << 20
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class NotRegularFile(OSError):
    """The path names a directory, FIFO, socket or device; `kind` says which."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind


def file_kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def read_regular(path: str, limit: int) -> bytes:
    """At most `limit + 1` bytes of the regular file at `path` (symlinks followed).

    A caller compares the length with `limit` to tell a file that is too large: a file that
    grows while it is read, or whose size lies (0 in /proc), is still read only that far.
    Special files raise NotRegularFile before they are opened: opening a FIFO blocks until a
    writer comes, and reading a device (/dev/zero) never ends. The open is non-blocking in case
    the path is swapped for one of them between the check and the open."""
    fd = _open_regular_fd(path)
    try:
        info = os.fstat(fd)
        # One read of the size stat reports (+1 to see growth) is the usual case; past that,
        # small chunks up to the limit.
        expected = min(info.st_size, limit) + 1
        parts: list[bytes] = []
        total = 0
        while total <= limit:
            want = expected - total if total < expected else min(CHUNK, limit + 1 - total)
            chunk = os.read(fd, want)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def open_regular(path: str):
    """The regular file at `path` opened for binary reading (symlinks followed), checked as
    read_regular checks it: special files raise NotRegularFile and are never opened blocking."""
    return os.fdopen(_open_regular_fd(path), "rb")


def _open_regular_fd(path: str) -> int:
    """A descriptor of the regular file at `path`; NotRegularFile for anything else, checked
    before the open and again on the descriptor (the path may be swapped in between)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFile(path, file_kind(info.st_mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path, file_kind(info.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd
