"""Local paths and fsspec URLs (s3://bucket/key, memory://...) behind one small set of calls.

Local paths stay plain paths (no file://) so users and error messages see what they typed.
Remote file systems are built by fsspec from the URL; credentials come from the environment
(storage.credentials), never from call arguments, so they never reach flow parameters or logs.
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.core import split_protocol


def is_remote(url: str | Path) -> bool:
    protocol, _ = split_protocol(str(url))
    return protocol not in (None, "file", "local")


def join(base: str | Path, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base, *parts))


def name(url: str | Path) -> str:
    """The last path component: 'ds' for s3://bucket/ds/ and for /data/ds."""
    return posixpath.basename(str(url).rstrip("/"))


def filesystem(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, path inside it) for a local path or a URL."""
    from storage.credentials import check_url, storage_options

    url = str(url)
    if not is_remote(url):
        return fsspec.filesystem("file"), os.path.abspath(url)
    check_url(url)
    protocol, _ = split_protocol(url)
    fs, path = fsspec.core.url_to_fs(url, **storage_options(protocol))
    return fs, path


def _url(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    if not is_remote(like):
        return path
    protocol = split_protocol(like)[0]
    return f"{protocol}://{path}"


def exists(url: str | Path) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str | Path) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str | Path) -> str:
    return read_bytes(url).decode("utf-8")


def open_input(url: str | Path, **options) -> io.BufferedIOBase:
    """Open for reading (pyarrow and webdataset take file objects); options go to fs.open."""
    fs, path = filesystem(url)
    return fs.open(path, "rb", **options)


# Remote Parquet files up to this size (shard indexes, identities, small plans) are read whole
# into Arrow's own memory; a bigger one (the plan of millions of inputs, read a row group at a
# time) stays a Python file object.
ARROW_IN_MEMORY_MAX = 64 << 20


def open_for_arrow(url: str | Path):
    """A file to hand pyarrow's readers, holding no Python object where it can.

    pyarrow finishes tearing down a Parquet scan on its own threads after the read returns.
    With a Python file object that teardown takes the GIL; if it comes while the interpreter
    exits, Python ends the thread with pthread_exit and C++ aborts the process ("terminate called
    without an active exception") after a short command such as `fgid status` has printed its
    output (apache/arrow#33975, #34314). So a local file is Arrow's own, and a remote one up to
    ARROW_IN_MEMORY_MAX is copied into an Arrow buffer."""
    import pyarrow as pa

    if not is_remote(url):
        return pa.OSFile(str(url))
    handle = open_input(url)
    size = getattr(handle, "size", None)
    if size is None or size > ARROW_IN_MEMORY_MAX:
        return handle
    with handle:
        data = handle.read(ARROW_IN_MEMORY_MAX + 1)
    if len(data) > ARROW_IN_MEMORY_MAX:  # replaced by a bigger object since it was opened
        return open_input(url)
    return pa.BufferReader(arrow_owned(data))


def arrow_owned(data: bytes):
    """`data` copied into a buffer Arrow allocated (a py_buffer would keep the bytes object)."""
    import numpy as np
    import pyarrow as pa

    buffer = pa.allocate_buffer(len(data))
    np.frombuffer(buffer, np.uint8)[:] = np.frombuffer(data, np.uint8)
    return buffer


def is_dir(url: str | Path) -> bool:
    """A local folder, or an object-store prefix that has objects below it (or a bucket)."""
    fs, path = filesystem(url)
    return fs.isdir(path)


def size(url: str | Path) -> int:
    """Size in bytes; FileNotFoundError if there is no such file or object."""
    fs, path = filesystem(url)
    return int(fs.size(path))


def makedirs(url: str | Path) -> None:
    """Create a local folder; object stores have no folders, so nothing to do there."""
    if not is_remote(url):
        Path(url).mkdir(parents=True, exist_ok=True)


def list_files(folder: str | Path, pattern: str = "*") -> list[str]:
    """Files directly in `folder` whose name matches `pattern` (hidden ones excluded), sorted."""
    fs, path = filesystem(folder)
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=True):
        base = posixpath.basename(entry["name"].rstrip("/"))
        if entry["type"] == "file" and not base.startswith(".") and fnmatch.fnmatch(base, pattern):
            found.append(_url(fs, entry["name"], str(folder)))
    return sorted(found)


def walk_files(folder: str | Path) -> list[str]:
    """Every file below `folder`, at any depth, sorted; names as `folder` spells them."""
    fs, path = filesystem(folder)
    if not fs.isdir(path):
        return []
    return sorted(_url(fs, found, str(folder)) for found in fs.find(path))


def iter_files(folder: str | Path) -> Iterator[str]:
    """Every file below `folder`, at any depth, a directory at a time (sorted within one, not
    across them): a bucket of millions of objects is never one list; names as `folder` spells
    them."""
    fs, path = filesystem(folder)
    if not fs.isdir(path):
        return
    for root, _dirs, files in fs.walk(path):
        yield from (_url(fs, posixpath.join(root, name), str(folder)) for name in sorted(files))
        fs.invalidate_cache(root)  # the listing cache would hold every name seen


def remove(url: str | Path) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm_file(path)
