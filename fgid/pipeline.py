"""The build as plain Python: plan, process each shard through the stages, finalize.

Prefect (flows/build.py) wires the same three functions into tasks; nothing here imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import storage
from fgid import history, progress, version
from fgid.config import BuildConfig
from fgid.dataset import Dataset, NotADataset
from fgid.errors import UsageError
from fgid.inputs import PLAN_FILE, InputItem, PlannedShard, ShardPlan, iter_items
from fgid.planfile import PlanWriter, copy_plan, diff_plans, write_listing
from fgid.prefetch import ReadAhead, ThreadedDecodeStage
from fgid.protocols import ModelSet
from fgid.sample import Sample
from fgid.schema import FORMAT_VERSION, STATUS_OK, reason_code
from fgid.stages import STAGE_ORDER
from fgid.stages.align import AlignStage
from fgid.stages.base import Stage
from fgid.stages.caption import CaptionStage
from fgid.stages.decode import DecodeStage
from fgid.stages.detect import DetectStage
from fgid.stages.identity import AttributeStage, EmbedStage
from fgid.stages.parse import ParseStage, regions_unseen
from fgid.writer import ShardWriter, encode_sample
from storage.scratch import scratch

log = logging.getLogger(__name__)


class OutputMismatch(UsageError):
    """The output folder holds a build of other inputs or another configuration."""


def build_stages(
    config: BuildConfig,
    models: ModelSet,
    journal: str | None = None,
    decode_pool: ThreadPoolExecutor | None = None,
) -> list[Stage]:
    args = {
        DecodeStage: (config.decode, config.download),
        DetectStage: (models.detector, config.detect),
        AlignStage: (config.align,),
        ParseStage: (models.parser,),
        EmbedStage: (models.embedder,),
        AttributeStage: (models.attributes,),
        CaptionStage: (models.captioner, config, journal),
    }
    stages = [stage(*args[stage]) for stage in STAGE_ORDER]
    if decode_pool is None:
        return stages
    # The same decoding, the images of a batch side by side on the pool.
    threaded = ThreadedDecodeStage(config.decode, decode_pool, config.download)
    return [threaded if isinstance(s, DecodeStage) else s for s in stages]


def prepare_output(
    inputs: list[str], out_dir: str, config: BuildConfig, append: bool = False
) -> list[PlannedShard]:
    """_prepare_output, then the `planned` progress event (the CLI's bar learns its total)."""
    plans = _prepare_output(inputs, out_dir, config, append)
    progress.planned(sum(p.size for p in plans), len(plans))
    return plans


def _prepare_output(
    inputs: list[str], out_dir: str, config: BuildConfig, append: bool = False
) -> list[PlannedShard]:
    """Plan the shards and record the plan, or check a rerun against the recorded one; returns
    the plan's outline (each shard's inputs are read when it is built: Dataset.shard_plan).

    With `append`, inputs the recorded plan lacks become new shards numbered after the existing
    ones (the recorded rows stay as they are), recorded in the build history; inputs that
    disappeared are reported and kept. Listing, sorting and comparing run in bounded memory:
    the listing goes to a local temporary plan file first (fgid.planfile)."""
    dataset = Dataset(out_dir)
    # A caller that holds the dataset's lock passes; a build while another process holds it
    # would delete that process's files or mix two plans: refused (DatasetInUse).
    dataset.check_free()
    build_info = {
        "config_hash": config.output_hash(),
        "config": config.model_dump(mode="json"),
        "format_version": FORMAT_VERSION,
    }
    previous = dataset.build_info()
    # Samples taken down by fgid.removal stay out of the plan, so a rerun neither rebuilds nor
    # re-adds them; a rerun during an unfinished removal is refused (RemovalPending).
    removed = dataset.removed_for_planning()
    items = iter_items(inputs, config.labels, columns=config.inputs)
    with scratch("plan") as folder:
        listing = os.path.join(folder, "listing.parquet")
        # Listed before anything is written: a bad input found now leaves the output as it was.
        planned = write_listing(listing, items, config.shard_size, removed)
        dataset.prepare()
        if previous is None:
            history.start(dataset, history.BUILD, planned, inputs)
            copy_plan(listing, dataset.root)
            dataset.write_build_info(build_info)
            return planned
        if previous["config_hash"] != build_info["config_hash"]:
            changed = config_changes(previous.get("config", {}), build_info["config"])
            raise OutputMismatch(
                f"{dataset.root} was built with another configuration ({changed}); use a new "
                "--out, or the settings of the first run"
            )
        recorded = dataset.outline()
        if not append:
            # An appended dataset's shards are not one sharding of its inputs: the same inputs
            # with the same fields is the same plan.
            diff = diff_plans(dataset.path(PLAN_FILE), listing)
            if not diff.same:
                added = "; or --append to add the new inputs to it" if diff.added else ""
                raise OutputMismatch(
                    f"{dataset.root} was planned from other inputs ({diff.describe()}); use a "
                    f"new --out, or the inputs of the first run{added}"
                )
            return recorded
        return recorded + _append(dataset, recorded, listing, inputs, config.shard_size)


def _append(
    dataset: Dataset,
    recorded: list[PlannedShard],
    listing: str,
    inputs: list[str],
    shard_size: int,
) -> list[PlannedShard]:
    """Shards for the inputs `recorded` lacks, numbered after every shard it ever had."""
    done = [r for r in dataset.history() if r["status"] == history.DONE]
    first = 1 + max(
        [p.shard_id for p in recorded]
        + dataset.shards_on_disk()
        # A shard emptied by a takedown leaves the plan; its number is not given again.
        + [r["last_shard"] for r in done if r.get("last_shard") is not None],
        default=-1,
    )
    added = os.path.join(os.path.dirname(listing), "added.parquet")
    with storage.atomic_open(added) as handle, PlanWriter(handle) as writer:
        diff = diff_plans(
            dataset.path(PLAN_FILE), listing, writer, shard_size=shard_size, first=first
        )
    plans = writer.outline()
    if diff.missing:
        log.warning(
            "%d planned inputs are no longer in the inputs; their shards stay (`fgid remove` "
            "takes samples out)",
            diff.missing,
        )
    if not plans:
        log.info("nothing new in the inputs")
        return []
    history.record_earlier_build(dataset, recorded)
    record = history.start(dataset, history.APPEND, plans, inputs, diff.missing)
    copy_plan(added, dataset.root, after_recorded=True)
    log.info(
        "appending %d inputs as shards %d-%d (build %d)",
        diff.added,
        plans[0].shard_id,
        plans[-1].shard_id,
        record["number"],
    )
    return plans


def config_changes(before: dict, now: dict, prefix: str = "") -> str:
    """'detect.min_score 0.5 -> 0.6, shard_size 4 -> 8': the settings that differ."""
    diffs = []
    for name in sorted(before.keys() | now.keys()):
        old, new = before.get(name), now.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            inner = config_changes(old, new, f"{prefix}{name}.")
            diffs += [inner] if inner else []
        elif old != new:
            diffs.append(f"{prefix}{name} {old!r} -> {new!r}")
    return ", ".join(diffs)


def shard_done(out_dir: str, shard_id: int) -> bool:
    return Dataset(out_dir).shard_done(shard_id)


def shard_stats(out_dir: str, shard_id: int) -> dict:
    return Dataset(out_dir).read_stats(shard_id)


def sample_meta(sample: Sample, models: ModelSet, config: BuildConfig, unseen: list[str]) -> dict:
    face, attrs = sample.face, sample.attributes
    return {
        "key": sample.key,
        "source": sample.source,
        "sha256": sample.sha256,
        "original_size": [sample.width, sample.height],
        "source_info": sample.source_info,
        "face": {
            "box": [round(float(v), 2) for v in face.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
            "score": round(face.score, 5),
            "count": sample.face_count,
        },
        "aligned": {
            "size": config.align.size,
            "transform": [[round(float(v), 6) for v in row] for row in sample.transform],
        },
        "age": attrs.age,
        "gender": attrs.gender,
        "attributes_extra": attrs.extra,
        "identity": {"label": sample.label, "source": "label" if sample.label else "cluster"},
        "regions": {"present": sample.regions, "unseen": unseen},
        "embedding": {"dim": int(sample.embedding.shape[0]), "model": models.embedder.name},
        "models": models.describe(),
        "versions": {"fgid": version()},
        "config_hash": config.output_hash(),
        "format_version": FORMAT_VERSION,
    }


def load_batch(
    shard: int,
    decode: Stage,
    prepare: Callable[[list], None] | None,
    chunk: list[InputItem],
) -> list[Sample]:
    """One chunk's samples, decoded and, when the detector offers `prepare_batch`, pre-processed
    for it; runs on the read-ahead thread while the model stages work on earlier batches."""
    batch = [Sample(it.key, shard, it.source, it.label) for it in chunk]
    for sample, item in zip(batch, chunk, strict=True):
        provenance = item.provenance()
        if provenance:  # absent for plain files, so their json stays as it was
            sample.source_info = {"provenance": provenance}
    decode(batch)
    if prepare is not None:
        prepare([s.image for s in batch if s.ok])
    return batch


def encoded(
    sample: Sample, models: ModelSet, config: BuildConfig, unseen: list[str]
) -> dict[str, bytes] | None:
    """A kept sample's tar members; None for a rejected one (its index row says why)."""
    if not sample.ok:
        return None
    meta = sample_meta(sample, models, config, unseen)
    return encode_sample(sample, meta, config.align.jpeg_quality)


def process_shard(plan: ShardPlan, out_dir: str, config: BuildConfig, models: ModelSet) -> dict:
    """Run every input of one shard through the stages and commit the shard. Returns its stats.

    Batches are decoded `config.prefetch_batches` ahead of the model stages (fgid.prefetch);
    their order, and so the shard's bytes, is the plan's either way."""
    started = time.perf_counter()
    journal = Dataset(out_dir).shard(plan.shard_id).journal
    unseen = regions_unseen(models.parser)
    writer = ShardWriter(str(out_dir), plan.shard_id)
    size = config.batch_size
    chunks = [plan.items[i : i + size] for i in range(0, len(plan.items), size)]
    try:
        with contextlib.ExitStack() as stack:
            pool = encoders = None
            if config.decode_workers > 1:
                pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="fgid-decode")
                stack.enter_context(pool)
                # Its own threads: on the decode pool, a batch's encoding would queue behind
                # the decoding of the batches read ahead.
                encoders = ThreadPoolExecutor(
                    config.decode_workers, thread_name_prefix="fgid-encode"
                )
                stack.enter_context(encoders)
            stages = build_stages(config, models, journal, pool)
            decode, model_stages = stages[0], stages[1:]
            prepare = getattr(models.detector, "prepare_batch", None)
            load = partial(load_batch, plan.shard_id, decode, prepare)
            batches = stack.enter_context(ReadAhead(load, chunks, config.prefetch_batches))
            loop_started = time.perf_counter()
            encode = partial(encoded, models=models, config=config, unseen=unseen)
            for batch in batches:
                for stage in model_stages:
                    stage(batch)
                # JPEG and PNG encoding release the GIL: a batch's samples encode side by
                # side, and are written in plan order, so the shard's bytes do not change.
                members = list(encoders.map(encode, batch)) if encoders else map(encode, batch)
                for sample, sample_members in zip(batch, members, strict=True):
                    writer.add(sample, sample_members)
                    sample.release()
                progress.batch_finished(plan.shard_id, len(batch), sum(not s.ok for s in batch))
            loop_seconds = time.perf_counter() - loop_started
        reasons = Counter(reason_code(r["reason"]) for r in writer.rows if r["reason"])
        timings = {s.name: s.timing.as_dict() for s in stages}
        # How long the model stages waited for decoded batches: on a GPU, its idle share.
        timings[decode.name].update(
            input_wait_seconds=round(batches.wait_seconds, 6),
            model_loop_seconds=round(loop_seconds, 6),
            input_wait_fraction=round(batches.wait_seconds / loop_seconds, 4)
            if loop_seconds > 0
            else None,
        )
        stats = {
            "shard": plan.shard_id,
            "inputs": len(plan.items),
            "ok": sum(r["status"] == STATUS_OK for r in writer.rows),
            "rejected": sum(r["status"] != STATUS_OK for r in writer.rows),
            "reasons": dict(sorted(reasons.items())),
            "stages": timings,
            "tar_bytes": writer.bytes_written,
            "tar_write_seconds": round(writer.write_seconds, 4),
            "wall_seconds": None,
            "config_hash": config.output_hash(),
            "models": models.describe(),
        }
        stats["wall_seconds"] = round(time.perf_counter() - started, 3)
        writer.commit(stats)
    except BaseException:
        try:
            writer.abort()
        except Exception:  # noqa: BLE001 - the shard's own error is the one to report
            log.exception("shard %05d: cleaning up after the failure failed too", plan.shard_id)
        raise  # the original exception, whatever the cleanup did
    log.info(
        "shard %05d: %d ok, %d rejected in %.1fs",
        plan.shard_id,
        stats["ok"],
        stats["rejected"],
        stats["wall_seconds"],
    )
    return stats


def up_to_date(out_dir: str, plans: list[PlannedShard]) -> bool:
    """Every planned shard done and finalized since, no build record open: nothing to do."""
    dataset = Dataset(out_dir)
    if history.pending(dataset) or not all(dataset.shard_done(p.shard_id) for p in plans):
        return False
    try:
        summary = dataset.summary()
    except NotADataset:
        return False
    planned = sum(p.size for p in plans)
    return (
        summary["shards"] == {"planned": len(plans), "done": len(plans)}
        and summary["inputs"]["planned"] == planned
    )


def build(
    inputs: list[str],
    out_dir: str,
    config: BuildConfig,
    models: ModelSet | None = None,
    append: bool = False,
) -> dict:
    """The whole build without Prefect: same plan, same shards, same finalize. With `append`,
    new inputs are added to an existing build (prepare_output)."""
    from fgid.card import write_card
    from fgid.finalize import finalize
    from fgid.models import leased_model_set
    from fgid.status import recording

    with contextlib.ExitStack() as stack:
        stack.enter_context(Dataset(out_dir).lock("fgid build"))
        plans = prepare_output(inputs, out_dir, config, append)
        if append and up_to_date(out_dir, plans):
            log.info("nothing new: %s is up to date", out_dir)
            return Dataset(out_dir).summary()
        stack.enter_context(recording(Dataset(out_dir), plans))
        todo = [p for p in plans if not shard_done(out_dir, p.shard_id)]
        log.info(
            "%d inputs in %d shards planned, %d to do",
            sum(p.size for p in plans),
            len(plans),
            len(todo),
        )
        for plan in plans:
            if plan not in todo:
                progress.shard_skipped(shard_stats(out_dir, plan.shard_id))
        if todo and models is None:
            models = stack.enter_context(leased_model_set(config))
        dataset = Dataset(out_dir)
        for plan in todo:
            shard = dataset.shard_plan(plan.shard_id)
            progress.shard_finished(process_shard(shard, out_dir, config, models))
        summary = finalize(out_dir, config)
        write_card(out_dir, summary)
        record_finished(out_dir, summary)
    return summary


def record_finished(out_dir: str, summary: dict) -> None:
    """Close the build's history records once every shard is in the summary and the card:
    until then a rerun of an append is not "nothing new"."""
    if summary["complete"]:
        history.finish(Dataset(out_dir))
