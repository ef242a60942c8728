"""Add or replace captions in a built dataset with another captioner, one shard at a time.

Only the caption members and each sample's `json` change; detection, parsing and embeddings are
not recomputed, and every other member is copied byte for byte with the writer's fixed headers.
A shard is captioned in two passes: captions go to the run's journal batch by batch, then the tar
is rewritten from the journal (temp name + rename, or one upload), then its stats, which record
the run per field and are the commit point, and the journal is removed last. A rerun skips
journaled samples; batches follow fixed positions in the shard, so a resumed shard is byte-identical
to an uninterrupted one. A run holds the dataset's lock: it refuses to start while a build or a
removal writes the same folder, and they refuse while it runs.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np

from fgid import schema
from fgid.captioning.captioners import leased_captioner
from fgid.captioning.journal import Journal
from fgid.captioning.run import (
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
from fgid.config import BuildConfig
from fgid.dataset import Dataset
from fgid.protocols import Captioner
from fgid.shardtar import (
    add_sample,
    decode_meta,
    decode_rgb,
    encode_meta,
    open_samples,
    rewrite_tar,
)
from fgid.stages.caption import caption_fields

log = logging.getLogger(__name__)


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
    return decode_rgb(jpg)


def _caption_batch(batch: list, captioner: Captioner, run: CaptionRun, journal: Journal) -> None:
    todo = [(key, members) for key, members in batch if key not in journal.entries]
    if not todo:
        return
    images = [_rgb(m[schema.IMAGE]) for _, m in todo]
    hints = [_hints(decode_meta(m[schema.META])) for _, m in todo]
    texts = caption_fields(captioner, images, run.fields, hints)
    journal.add({key: {n: texts[n][i] for n in run.fields} for i, (key, _) in enumerate(todo)})


def _caption_missing(url: str, captioner: Captioner, run: CaptionRun, journal: Journal, size: int):
    """Pass 1: journal a caption for every sample without one, in fixed-position batches."""
    batch: list = []
    with open_samples(url) as samples:
        for key, members in samples:
            # Journaled samples keep their slot in the batch, so batches never shift on a rerun.
            keep = key not in journal.entries
            wanted = {ext: members[ext] for ext in (schema.IMAGE, schema.META)} if keep else {}
            batch.append((key, wanted))
            if len(batch) == size:
                _caption_batch(batch, captioner, run, journal)
                batch = []
    if batch:
        _caption_batch(batch, captioner, run, journal)


def _with_captions(members: dict[str, bytes], captions: dict, run: CaptionRun, model: str):
    meta = decode_meta(members[schema.META])
    provenance = meta.get("captions") or {
        name: {"model": meta["models"]["captioner"], "prompt": prompt, "run": BUILD_RUN}
        for name, prompt in DEFAULT_FIELDS.items()
    }
    for name, prompt in run.fields.items():
        # Existing fields are replaced where they stand; new ones follow the sample's members.
        members[schema.caption_member(name)] = captions[name].encode("utf-8")
        provenance[name] = {"model": model, "prompt": prompt, "run": run.id}
    meta["captions"] = provenance
    members[schema.META] = encode_meta(meta)
    return members


def _rewrite(url: str, journal: Journal, run: CaptionRun, model: str) -> int:
    """Pass 2: the new tar from the old one and the journal; returns its data bytes."""
    total = 0
    with rewrite_tar(url) as (old, new):
        for key, members in old:
            if key not in journal.entries:
                raise RuntimeError(f"sample {key} has no journaled caption")
            total += add_sample(new, key, _with_captions(members, journal.entries[key], run, model))
    return total


def recaption_shard(
    dataset: str, shard_id: int, captioner: Captioner, run: CaptionRun, *, batch_size: int
) -> dict:
    """Caption one built shard for `run` and commit its new version; returns its new stats."""
    out = str(dataset)
    files = Dataset(out).shard(shard_id)
    stats = read_stats(out, shard_id)
    if shard_at_run(stats, run):
        return stats
    clash = conflicts(stats, run)
    if clash:
        raise FieldExists(f"shard {shard_id:05d} has {', '.join(clash)} from another run")
    started = time.perf_counter()
    journal = Journal(journal_url(out, run.id, shard_id), captioner.name)
    resumed = len(journal.entries)
    _caption_missing(files.tar, captioner, run, journal, batch_size)
    tar_bytes = _rewrite(files.tar, journal, run, captioner.name)
    owners = dict(current_fields(stats))
    owners.update({name: {"run": run.id, "model": captioner.name} for name in run.fields})
    stats.update(captions=owners, tar_bytes=tar_bytes)
    Dataset(out).write_stats(shard_id, stats)
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
    with contextlib.ExitStack() as stack:
        stack.enter_context(Dataset.open(dataset).lock("fgid caption"))
        run = prepare_run(dataset, config, fields, replace)
        todo = shards_to_caption(dataset, run)
        if todo and captioner is None:
            captioner = stack.enter_context(leased_captioner(config))
        for shard_id in todo:
            recaption_shard(dataset, shard_id, captioner, run, batch_size=config.caption.batch_size)
        return finish_run(dataset, run)
