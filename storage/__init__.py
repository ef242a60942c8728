"""Where bytes live: local paths and fsspec URLs (s3://...) behind the same calls."""

from storage.atomic import atomic_open, atomic_write_bytes, atomic_write_text, remove_stale_tmp
from storage.files import (
    exists,
    filesystem,
    is_dir,
    is_remote,
    iter_files,
    join,
    list_files,
    makedirs,
    name,
    open_for_arrow,
    open_input,
    read_bytes,
    read_text,
    remove,
    size,
    walk_files,
)

__all__ = [
    "atomic_open", "atomic_write_bytes", "atomic_write_text", "exists", "filesystem", "is_dir",
    "is_remote", "iter_files", "join", "list_files", "makedirs", "name", "open_for_arrow",
    "open_input", "read_bytes", "read_text", "remove", "remove_stale_tmp", "size", "walk_files",
]  # fmt: skip
