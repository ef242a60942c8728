"""webdataset opener for fsspec URLs (s3://...), so shards stream straight from object storage."""

from __future__ import annotations

from fsspec.core import split_protocol
from webdataset.gopen import gopen_schemes

from storage.files import is_remote, open_input

# Sequential tar reads: read ahead in large blocks instead of one request per member.
READ_BLOCK = 16 * 2**20
OBJECT_STORE_SCHEMES = ("s3", "s3a")


def open_for_webdataset(url: str, mode: str = "rb", bufsize: int = 8192, **_: object):
    """A gopen handler: webdataset calls it with the shard URL; credentials come from the
    environment through storage.filesystem, never from the URL, so logged URLs hold no secret."""
    if not mode.startswith("r"):
        raise ValueError(f"{mode}: shards are written by fgid, webdataset only reads them")
    return open_input(url, block_size=READ_BLOCK, cache_type="readahead")


def register(url: str) -> None:
    """Make webdataset open `url`'s scheme through fsspec (no-op for local paths).

    webdataset's own handlers (http via curl, gs via gsutil, pipe:) stay as they are."""
    if is_remote(url):
        gopen_schemes.setdefault(split_protocol(url)[0], open_for_webdataset)


# On import, not only on call: a DataLoader worker started with "spawn" unpickles the dataset in
# a fresh interpreter, and importing this module there (see training.stream) restores the scheme.
for _scheme in OBJECT_STORE_SCHEMES:
    register(f"{_scheme}://")
