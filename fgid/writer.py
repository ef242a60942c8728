"""Write one shard: a webdataset tar, its Parquet index and its stats, in that order.

The stats file is written last and is the shard's commit point: a shard is done when its stats
file exists. Each file is written under a temporary name and renamed, so a reader never sees a
partial tar, and a shard rewritten after a crash is byte-identical (fixed tar headers, stable
encoders, rows in plan order). The shard's caption journal (fgid.stages.caption), which lets a
rerun skip samples captioned before a crash, is deleted once the tar and index are in place.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import storage
from fgid.sample import Sample
from fgid.schema import INDEX_SCHEMA, shard_name

JOURNAL_SUFFIX = ".caption-journal.jsonl"


def shard_paths(out_dir: str, shard_id: int) -> dict[str, str]:
    """Where shard `shard_id` lives under `out_dir` (a local path or a URL)."""
    base = storage.join(out_dir, "shards", shard_name(shard_id))
    return {
        "tar": f"{base}.tar",
        "index": f"{base}.parquet",
        "stats": f"{base}.stats.json",
        # Not a temporary name (those are deleted before a shard is redone): it must outlive one.
        "journal": f"{base}{JOURNAL_SUFFIX}",
    }


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one member with fixed headers (mtime 0, mode 0644, no owner), so that a shard
    written twice, or rewritten by a caption run or a takedown, is byte-identical."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


@contextlib.contextmanager
def rewrite_tar(url: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarFile]]:
    """(old, new): stream the shard tar at `url` and write its replacement, which takes the old
    one's place atomically only if the block succeeds. Write members with `add_member`."""
    with (
        storage.open_input(url) as source,
        tarfile.open(fileobj=source, mode="r|") as old,
        storage.atomic_open(url) as target,
        tarfile.open(fileobj=target, mode="w", format=tarfile.USTAR_FORMAT) as new,
    ):
        yield old, new


def encode_sample(sample: Sample, meta: dict, jpeg_quality: int) -> dict[str, bytes]:
    ok, jpg = cv2.imencode(
        ".jpg",
        cv2.cvtColor(sample.aligned, cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality],
    )
    ok2, png = cv2.imencode(".png", sample.label_map)
    if not (ok and ok2):
        raise ValueError("image encoding failed")
    npy = io.BytesIO()
    np.save(npy, sample.embedding.astype(np.float32), allow_pickle=False)
    return {
        "jpg": jpg.tobytes(),
        "mask.png": png.tobytes(),
        "id.npy": npy.getvalue(),
        "caption.txt": sample.caption.encode("utf-8"),
        "facial.txt": sample.facial.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def index_row(sample: Sample) -> dict:
    attrs = sample.attributes
    face = sample.face
    return {
        "key": sample.key,
        "shard": sample.shard,
        "source": sample.source,
        "status": sample.status,
        "reason": sample.reason,
        "sha256": sample.sha256,
        "label": sample.label,
        "width": sample.width,
        "height": sample.height,
        "face_count": sample.face_count,
        "det_score": face.score if face is not None and sample.ok else None,
        "age": attrs.age if attrs and sample.ok else None,
        "gender": attrs.gender if attrs and sample.ok else None,
        "regions": list(sample.regions) if sample.ok else None,
        "embedding": sample.embedding.tolist() if sample.ok else None,
    }


class ShardWriter:
    """Streams samples into `shards/NNNNN.tar`; `commit` writes the index and stats."""

    def __init__(self, out_dir: str, shard_id: int) -> None:
        self.paths = shard_paths(out_dir, shard_id)
        self._tar_cm = storage.atomic_open(self.paths["tar"])
        self._handle = self._tar_cm.__enter__()
        # Closed in commit()/abort(): the shard stays open while its batches stream in.
        self._tar = tarfile.open(fileobj=self._handle, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.rows: list[dict] = []
        self.bytes_written = 0
        self.write_seconds = 0.0

    def add(self, sample: Sample, members: dict[str, bytes] | None) -> None:
        self.rows.append(index_row(sample))
        if members is None:
            return
        start = time.perf_counter()
        for ext, data in members.items():
            add_member(self._tar, f"{sample.key}.{ext}", data)
            self.bytes_written += len(data)
        self.write_seconds += time.perf_counter() - start

    def commit(self, stats: dict) -> None:
        self._tar.close()
        self._tar_cm.__exit__(None, None, None)
        table = pa.Table.from_pylist(self.rows, schema=INDEX_SCHEMA)
        with storage.atomic_open(self.paths["index"]) as handle:
            pq.write_table(table, handle, compression="zstd")
        # Its captions are in the tar now. Deleted just before the commit point, not after it: a
        # deletion cut short after it would leave a stray file that no rerun revisits (the shard
        # is done, and a retried task skips it); here the worst case is captioning one shard again.
        storage.remove(self.paths["journal"])
        storage.atomic_write_text(self.paths["stats"], json.dumps(stats, indent=2, sort_keys=True))

    def abort(self) -> None:
        """Drop the partial tar (its temporary file), leaving any finished files untouched."""
        try:
            self._tar.close()
        finally:
            self._tar_cm.__exit__(RuntimeError, RuntimeError("aborted"), None)
