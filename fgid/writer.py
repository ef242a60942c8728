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
import time

import cv2
import numpy as np
import pyarrow as pa

import storage
from fgid import schema
from fgid.dataset import Dataset
from fgid.sample import Sample
from fgid.schema import INDEX_SCHEMA
from fgid.shardtar import add_sample, encode_meta, new_tar


def shard_paths(out_dir: str, shard_id: int) -> dict[str, str]:
    """Where shard `shard_id` lives under `out_dir` (a local path or a URL): Dataset.shard."""
    files = Dataset(out_dir).shard(shard_id)
    return {"tar": files.tar, "index": files.index, "stats": files.stats, "journal": files.journal}


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
        schema.IMAGE: jpg.tobytes(),
        schema.MASK: png.tobytes(),
        schema.EMBEDDING: npy.getvalue(),
        schema.CAPTION: sample.caption.encode("utf-8"),
        schema.FACIAL: sample.facial.encode("utf-8"),
        schema.META: encode_meta(meta),
    }


def index_row(sample: Sample) -> dict:
    attrs = sample.attributes
    face = sample.face
    provenance = sample.source_info.get("provenance", {})
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
        "source_caption": provenance.get("caption"),
        "source_license": provenance.get("license"),
        "source_url": provenance.get("url"),
    }


class ShardWriter:
    """Streams samples into `shards/NNNNN.tar`; `commit` writes the index and stats."""

    def __init__(self, out_dir: str, shard_id: int) -> None:
        self.dataset, self.shard_id = Dataset(out_dir), shard_id
        self.files = self.dataset.shard(shard_id)
        # Closed in commit()/abort(): the shard stays open while its batches stream in.
        self._files = contextlib.ExitStack()
        self._tar = self._files.enter_context(
            new_tar(self._files.enter_context(storage.atomic_open(self.files.tar)))
        )
        self.rows: list[dict] = []
        self.bytes_written = 0
        self.write_seconds = 0.0

    def add(self, sample: Sample, members: dict[str, bytes] | None) -> None:
        self.rows.append(index_row(sample))
        if members is None:
            return
        start = time.perf_counter()
        self.bytes_written += add_sample(self._tar, sample.key, members)
        self.write_seconds += time.perf_counter() - start

    def commit(self, stats: dict) -> None:
        self._files.close()
        self.dataset.write_index(
            self.shard_id, pa.Table.from_pylist(self.rows, schema=INDEX_SCHEMA)
        )
        # Its captions are in the tar now. Deleted just before the commit point, not after it: a
        # deletion cut short after it would leave a stray file that no rerun revisits (the shard
        # is done, and a retried task skips it); here the worst case is captioning one shard again.
        storage.remove(self.files.journal)
        self.dataset.write_stats(self.shard_id, stats)

    def abort(self) -> None:
        """Drop the partial tar (its temporary file), leaving any finished files untouched."""
        self._files.__exit__(RuntimeError, RuntimeError("aborted"), None)
