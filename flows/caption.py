"""The `caption` Prefect flow: add or replace captions in a built dataset, one task per shard.

Only wiring lives here; every step is a function of fgid.captioning (run, recaption), which
runs the same way without Prefect (fgid.captioning.recaption.recaption).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import storage
from fgid.captioning.captioners import leased_captioner
from fgid.captioning.recaption import recaption_shard
from fgid.captioning.run import (
    DEFAULT_FIELDS,
    CaptionRun,
    finish_run,
    prepare_run,
    read_stats,
    shard_at_run,
    shards_to_caption,
)
from fgid.config import BuildConfig
from fgid.dataset import Dataset
from flows.build import tag_flow_run
from flows.build_artifacts import artifact_key, dataset_name
from flows.retries import SHARD_RETRIES, describe
from flows.run_logs import send_fgid_logs
from flows.storage_secret import load_storage_secret


# As build_shard: only errors that can clear up are retried. A retry resumes from the shard's
# caption journal, so it captions only what the failed try had not.
@task(**SHARD_RETRIES, cache_policy=NO_CACHE, log_prints=False)
def caption_shard(dataset: str, shard_id: int, config: BuildConfig, run: CaptionRun) -> dict:
    """Caption one shard for `run`, or report it done (a retry after a crash at commit)."""
    send_fgid_logs()
    logger = get_run_logger()
    if shard_at_run(read_stats(dataset, shard_id), run):
        logger.info("shard %05d already has run %s", shard_id, run.id)
        return read_stats(dataset, shard_id)
    with leased_captioner(config) as captioner:
        stats = recaption_shard(
            dataset, shard_id, captioner, run, batch_size=config.caption.batch_size
        )
    logger.info("shard %05d: %d samples captioned by %s", shard_id, stats["ok"], captioner.name)
    return stats


def caption_run_name(dataset: str, shard_id: int) -> str:
    return f"{dataset} caption shard {shard_id:05d}"


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    config = params.get("config") or BuildConfig()
    return f"caption-{storage.name(params['dataset'])}-{config.models.set}"


def _record_markdown(record: dict) -> str:
    rows = "\n".join(f"| `{name}` | {prompt} |" for name, prompt in record["fields"].items())
    return (
        f"# Caption run `{record['id']}`\n\nCaptioner: `{record['captioner']}` "
        f"(models: {', '.join(record['models']) or 'none yet'}), status {record['status']}, "
        f"{len(record['shards']['captioned'])} shard(s) captioned.\n\n"
        f"| field | prompt |\n|---|---|\n{rows}\n"
    )


@flow(name="fgid-caption", flow_run_name=_run_name, log_prints=False)
def caption(
    dataset: str,
    config: BuildConfig | None = None,
    fields: dict[str, str] | None = None,
    replace: bool = False,
) -> dict:
    """Caption every built shard of `dataset` with `config`'s captioner; returns the run record."""
    config = config or BuildConfig()
    fields = fields or DEFAULT_FIELDS
    logger = get_run_logger()
    load_storage_secret()
    send_fgid_logs()
    name = storage.name(dataset)
    with Dataset.open(dataset).lock("fgid caption"):  # one writer: not during a build or removal
        run = prepare_run(dataset, config, fields, replace)
        run_tags = ["fgid", "caption", f"dataset:{name}", f"models:{config.models.set}",
                    f"caption-run:{run.id}"]  # fmt: skip
        tag_flow_run(run_tags)
        todo = shards_to_caption(dataset, run)
        logger.info("caption run %s (%s): %d shard(s) to caption", run.id, run.source, len(todo))
        # Tags go on the flow run only. A tagged task run passes through Prefect's tag-concurrency
        # leases: 0.3-0.6 s per task run on a 2-core machine (0.01 s untagged; Prefect 3.8).
        futures = [
            caption_shard.with_options(task_run_name=caption_run_name(name, shard_id)).submit(
                dataset, shard_id, config, run
            )
            for shard_id in todo
        ]
        for future in futures:
            future.wait()
        failed = [f for f in futures if not f.state.is_completed()]
        record = finish_run(dataset, run)
        create_markdown_artifact(
            _record_markdown(record),
            key=artifact_key("captions", dataset_name(dataset)),
            description="FGID caption run",
        )
        if failed:
            causes = "; ".join(_cause(f) for f in failed)
            raise RuntimeError(f"{len(failed)} shard(s) failed ({causes}); rerun to resume")
        return record


def _cause(future) -> str:
    error = future.result(raise_on_failure=False)
    return describe(error) if isinstance(error, BaseException) else str(future.state.message)
