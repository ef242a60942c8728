"""Random access into shard tars: one header scan per tar, then one ranged read per sample.

A shard tar stores each sample's members back to back, so a sample is one byte range (headers
included) that parses as a small tar of its own. Scanning reads only headers on a local disk
(seeks over the data); on object storage it reads ahead in large blocks, about one request per
block. The index keeps, per sample, its key and byte range in numpy arrays (~100 bytes a
sample), so a process can hold every shard's index. Reads go through fsspec (`cat_file` with
start and end): a plain file read locally, an HTTP range request on s3://. Members are judged as
fgid.shardtar judges them: only regular members of our name form, under the size cap, count.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import storage
from fgid.shardtar import MAX_MEMBER_BYTES, check_key, member_skip_reason, split_name

log = logging.getLogger(__name__)

SCAN_BLOCK = 4 * 2**20  # read-ahead while scanning remote headers: few requests per tar
_BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class TarIndex:
    """Byte ranges of the samples in one tar; keys sorted for binary search."""

    url: str
    keys: np.ndarray  # str, sorted
    starts: np.ndarray  # int64, offset of the sample's first header
    ends: np.ndarray  # int64, end of its last member's padded data

    @classmethod
    def scan(cls, url: str) -> TarIndex:
        ranges: dict[str, list[int]] = {}
        with (
            storage.open_input(url, block_size=SCAN_BLOCK, cache_type="readahead") as handle,
            tarfile.open(fileobj=handle, mode="r:") as tar,
        ):
            for info in tar:
                if member_skip_reason(info) is not None:
                    continue
                key = sample_key(info.name)
                end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
                span = ranges.setdefault(key, [info.offset, end])
                span[0], span[1] = min(span[0], info.offset), max(span[1], end)
        keys = np.array(sorted(ranges), dtype=str)
        spans = np.array([ranges[k] for k in keys], dtype=np.int64).reshape(-1, 2)
        return cls(url, keys, spans[:, 0].copy(), spans[:, 1].copy())

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return self._find(key) >= 0

    def _find(self, key: str) -> int:
        i = int(np.searchsorted(self.keys, key))
        return i if i < len(self.keys) and self.keys[i] == key else -1

    def read(self, key: str) -> dict[str, bytes]:
        """{extension: bytes} of sample `key`; KeyError if the tar has no such sample."""
        check_key(key)
        i = self._find(key)
        if i < 0:
            raise KeyError(f"{key} is not in {self.url}")
        start, end = int(self.starts[i]), int(self.ends[i])
        if end - start > MAX_SAMPLE_BYTES:
            raise ValueError(f"sample {key} spans {end - start} bytes: the tar changed")
        fs, path = storage.filesystem(self.url)
        return parse_members(fs.cat_file(path, start=start, end=end), key)


# A sample of a handful of members, each under the member cap.
MAX_SAMPLE_BYTES = 16 * MAX_MEMBER_BYTES


def sample_key(name: str) -> str:
    """webdataset's rule: the key ends at the first dot of the member name."""
    return name.split(".", 1)[0]


def parse_members(data: bytes, key: str) -> dict[str, bytes]:
    """The members of one sample from its byte range; ValueError unless the range holds
    exactly that sample's members (a stale index after the tar was rewritten)."""
    members, end = {}, 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            name = split_name(info.name)
            if member_skip_reason(info) is not None or name is None or name[0] != key:
                raise ValueError(f"byte range of {key} holds {info.name[:80]}: the tar changed")
            members[name[1]] = tar.extractfile(info).read()
            end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
    if not members or end != len(data):
        raise ValueError(f"byte range of {key} does not end with its last member: the tar changed")
    return members


class ShardReader:
    """Samples by (tar url, key), scanning each tar once per process and rescanning a tar
    that was rewritten since (a caption run or a takedown moves the members).

    With `cache_dir` (a local folder), indexes are also kept on disk under a name derived from
    the tar's URL, size and modification stamp, so the workers of a node and later runs (a
    resume) scan each tar once between them instead of once each: worth it on object storage,
    where a scan reads most of the tar."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._indexes: dict[str, TarIndex] = {}

    def index(self, url: str) -> TarIndex:
        found = self._indexes.get(url)
        if found is None:
            found = self._indexes[url] = self._load(url)
        return found

    def read(self, url: str, key: str) -> dict[str, bytes]:
        try:
            return self.index(url).read(key)
        except (KeyError, ValueError, tarfile.TarError) as error:
            log.info("rescanning %s after a stale read: %s", url, error)
            self._indexes[url] = self._load(url, fresh=True)
            return self._indexes[url].read(key)

    def _load(self, url: str, fresh: bool = False) -> TarIndex:
        if self.cache_dir is None:
            return TarIndex.scan(url)
        fs, path = storage.filesystem(url)
        info = fs.info(path)
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        name = hashlib.sha256(f"{url}|{info.get('size')}|{stamp}".encode()).hexdigest()
        cached = self.cache_dir / f"{name[:32]}.npz"
        if cached.is_file() and not fresh:
            try:
                with np.load(cached, allow_pickle=False) as saved:
                    return TarIndex(url, saved["keys"], saved["starts"], saved["ends"])
            except (OSError, ValueError, KeyError) as error:  # a torn or foreign file
                log.info("ignoring tar index cache %s: %s", cached, error)
        index = TarIndex.scan(url)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Workers may write the same index at once: each writes its own file, then renames.
        partial = cached.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(partial, keys=index.keys, starts=index.starts, ends=index.ends)
        os.replace(partial, cached)
        return index

    def __getstate__(self) -> dict:
        return {"cache_dir": self.cache_dir, "_indexes": {}}  # in-memory indexes stay per process
