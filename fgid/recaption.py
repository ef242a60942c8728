"""Add or replace captions in a built dataset with another captioner, one shard at a time.

Only the caption members and each sample's `json` change; detection, parsing and embeddings are
not recomputed, and every other member is copied byte for byte with the writer's fixed headers.
A shard is captioned in two passes: captions go to the run's journal batch by batch, then the tar
is rewritten from the journal (temp name + rename, or one upload), then its stats, which record
the run per field and are the commit point, and the journal is removed last. A rerun skips
journaled samples; batches follow fixed positions in the shard, so a resumed shard is byte-identical
to an uninterrupted one. Not to be run while a build or a removal writes the same folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Iterator

import numpy as np
from PIL import Image

import storage
from fgid.caption_journal import Journal
from fgid.caption_run import (
    BUILD_RUN,
    DEFAULT_FIELDS,
    CaptionRun,
    FieldExists,
    conflicts,
    current_fields,
    finish_run,
    journal_url,
    prepare_run,
    read_stats,
    shard_at_run,
    shards_to_caption,
)
from fgid.captioners import leased_captioner
from fgid.config import BuildConfig
from fgid.protocols import Captioner
from fgid.stages.caption import caption_fields
from fgid.writer import add_member, rewrite_tar, shard_paths

log = logging.getLogger(__name__)


def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: data}) per sample, members in tar order (a sample's members are adjacent)."""
    key, members = None, {}
    for member in tar:
        name, ext = member.name.split(".", 1)
        if name != key and members:
            yield key, members
            members = {}
        key = name
        members[ext] = tar.extractfile(member).read()
    if members:
        yield key, members


def _hints(meta: dict) -> dict:
    # What caption_hints gave the captioner at build time, read back from the sample's json.
    return {
        "age": meta.get("age"),
        "gender": meta.get("gender"),
        "regions": list(meta["regions"]["present"]),
        "face_count": meta["face"]["count"],
    }


def _rgb(jpg: bytes) -> np.ndarray:
    # PIL, as webdataset's "rgb8" decoder: the captioner sees the pixels training will see.
    with Image.open(io.BytesIO(jpg)) as image:
        return np.asarray(image.convert("RGB"))


def _caption_batch(batch: list, captioner: Captioner, run: CaptionRun, journal: Journal) -> None:
    todo = [(key, members) for key, members in batch if key not in journal.entries]
    if not todo:
        return
    images = [_rgb(m["jpg"]) for _, m in todo]
    hints = [_hints(json.loads(m["json"])) for _, m in todo]
    texts = caption_fields(captioner, images, run.fields, hints)
    journal.add({key: {n: texts[n][i] for n in run.fields} for i, (key, _) in enumerate(todo)})


def _caption_missing(url: str, captioner: Captioner, run: CaptionRun, journal: Journal, size: int):
    """Pass 1: journal a caption for every sample without one, in fixed-position batches."""
    batch: list = []
    with storage.open_input(url) as source, tarfile.open(fileobj=source, mode="r|") as tar:
        for key, members in _samples(tar):
            # Journaled samples keep their slot in the batch, so batches never shift on a rerun.
            keep = key not in journal.entries
            batch.append((key, {"jpg": members["jpg"], "json": members["json"]} if keep else {}))
            if len(batch) == size:
                _caption_batch(batch, captioner, run, journal)
                batch = []
    if batch:
        _caption_batch(batch, captioner, run, journal)


def _with_captions(members: dict[str, bytes], captions: dict, run: CaptionRun, model: str):
    meta = json.loads(members["json"])
    provenance = meta.get("captions") or {
        name: {"model": meta["models"]["captioner"], "prompt": prompt, "run": BUILD_RUN}
        for name, prompt in DEFAULT_FIELDS.items()
    }
    for name, prompt in run.fields.items():
        # Existing fields are replaced where they stand; new ones follow the sample's members.
        members[f"{name}.txt"] = captions[name].encode("utf-8")
        provenance[name] = {"model": model, "prompt": prompt, "run": run.id}
    meta["captions"] = provenance
    members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return members


def _rewrite(url: str, journal: Journal, run: CaptionRun, model: str) -> int:
    """Pass 2: the new tar from the old one and the journal; returns its data bytes."""
    total = 0
    with rewrite_tar(url) as (old, new):
        for key, members in _samples(old):
            if key not in journal.entries:
                raise RuntimeError(f"sample {key} has no journaled caption")
            members = _with_captions(members, journal.entries[key], run, model)
            for ext, data in members.items():
                add_member(new, f"{key}.{ext}", data)
                total += len(data)
    return total


def recaption_shard(
    dataset: str, shard_id: int, captioner: Captioner, run: CaptionRun, *, batch_size: int
) -> dict:
    """Caption one built shard for `run` and commit its new version; returns its new stats."""
    out = str(dataset)
    paths = shard_paths(out, shard_id)
    stats = read_stats(out, shard_id)
    if shard_at_run(stats, run):
        return stats
    clash = conflicts(stats, run)
    if clash:
        raise FieldExists(f"shard {shard_id:05d} has {', '.join(clash)} from another run")
    started = time.perf_counter()
    journal = Journal(journal_url(out, run.id, shard_id), captioner.name)
    resumed = len(journal.entries)
    _caption_missing(paths["tar"], captioner, run, journal, batch_size)
    tar_bytes = _rewrite(paths["tar"], journal, run, captioner.name)
    owners = dict(current_fields(stats))
    owners.update({name: {"run": run.id, "model": captioner.name} for name in run.fields})
    stats.update(captions=owners, tar_bytes=tar_bytes)
    storage.atomic_write_text(paths["stats"], json.dumps(stats, indent=2, sort_keys=True))
    journal.remove()
    log.info(
        "shard %05d captioned for %s in %.1fs (%d samples from the journal)",
        shard_id,
        run.id,
        time.perf_counter() - started,
        resumed,
    )
    return stats


def recaption(
    dataset: str,
    config: BuildConfig,
    fields: dict[str, str],
    replace: bool = False,
    captioner: Captioner | None = None,
) -> dict:
    """A whole caption run without Prefect; returns the run's record."""
    run = prepare_run(dataset, config, fields, replace)
    todo = shards_to_caption(dataset, run)
    with contextlib.ExitStack() as stack:
        if todo and captioner is None:
            captioner = stack.enter_context(leased_captioner(config))
        for shard_id in todo:
            recaption_shard(dataset, shard_id, captioner, run, batch_size=config.caption.batch_size)
    return finish_run(dataset, run)
