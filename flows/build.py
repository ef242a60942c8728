"""The `build` Prefect flow: plan, one retried task per unfinished shard, then finalize.

Only wiring lives here; every step is a function of fgid.pipeline / fgid.finalize, which run
the same way without Prefect.
"""

from __future__ import annotations

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

import storage
from fgid import progress
from fgid.card import write_card
from fgid.config import BuildConfig
from fgid.finalize import finalize
from fgid.inputs import ShardPlan
from fgid.models import leased_model_set
from fgid.pipeline import prepare_output, process_shard, shard_done, shard_stats
from fgid.report import STAGES, summary_markdown, summary_table
from flows.secrets import load_storage_secret


# botocore absorbs short storage outages itself; these retries cover longer ones (~45 s).
@task(retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE, log_prints=False)
def build_shard(plan: ShardPlan, out_dir: str, config: BuildConfig) -> dict:
    """Process one shard, or report it as already done (a retry after a crash at commit)."""
    logger = get_run_logger()
    if shard_done(out_dir, plan.shard_id):
        logger.info("shard %05d already done", plan.shard_id)
        return shard_stats(out_dir, plan.shard_id)
    with leased_model_set(config) as models:
        stats = process_shard(plan, out_dir, config, models)
    logger.info(
        "shard %05d: %d inputs, %d ok, %d rejected %s in %.1fs",
        plan.shard_id,
        stats["inputs"],
        stats["ok"],
        stats["rejected"],
        stats["reasons"],
        stats["wall_seconds"],
    )
    return stats


def artifact_key(kind: str, out_dir: str) -> str:
    # Artifact keys allow only lowercase letters, digits and dashes.
    name = storage.name(out_dir).lower().replace("_", "-")
    return f"fgid-{kind}-{name}"[:100]


@task(cache_policy=NO_CACHE)
def finalize_build(out_dir: str, config: BuildConfig) -> dict:
    summary = finalize(out_dir, config)
    create_markdown_artifact(
        summary_markdown(summary, out_dir),
        key=artifact_key("summary", out_dir),
        description="FGID build summary",
    )
    create_table_artifact(summary_table(summary), description="FGID build counts")
    card = write_card(out_dir, summary)
    # The API stores no binary artifacts; the UI renders data: images inside Markdown.
    create_markdown_artifact(
        f"{card['embedded_markdown']}\n\nFiles: `{card['readme']}` and its PNG plots.",
        key=artifact_key("card", out_dir),
        description="FGID dataset card",
    )
    get_run_logger().info(
        "%d samples, %d rejected, %d identities",
        summary["samples"],
        summary["rejected"],
        summary["identities"]["total"],
    )
    return summary


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return f"build-{storage.name(params['out'])}-{params['config'].models.set}"


def shard_run_name(dataset: str, shard_id: int) -> str:
    return f"{dataset} shard {shard_id:05d} {'>'.join(STAGES)}"


def tag_flow_run(run_tags: list[str]) -> None:
    # Tags are known only once parameters are; the run already exists, so add them to it.
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *run_tags}))


@flow(name="fgid-build", flow_run_name=_run_name, log_prints=False)
def build(inputs: list[str], out: str, config: BuildConfig | None = None) -> dict:
    """Build an FGID dataset from image folders, files and list files into `out`."""
    config = config or BuildConfig()
    logger = get_run_logger()
    load_storage_secret()  # deployments and `fgid serve` runs get credentials from the block too
    dataset = storage.name(out)
    run_tags = ["fgid", "build", f"dataset:{dataset}", f"models:{config.models.set}"]
    tag_flow_run(run_tags)
    plans: list[ShardPlan] = prepare_output(inputs, out, config)
    todo = [p for p in plans if not shard_done(out, p.shard_id)]
    logger.info(
        "%d shards planned, %d already done, %d to build",
        len(plans),
        len(plans) - len(todo),
        len(todo),
    )
    # Tags go on the flow run only. A tagged task run passes through Prefect's tag-concurrency
    # leases, which held the worker thread ~2.4 s after each 14 s shard (bench/build_bench.py).
    futures = [
        build_shard.with_options(task_run_name=shard_run_name(dataset, p.shard_id)).submit(
            p, out, config
        )
        for p in todo
    ]
    # Progress is reported here, as results arrive, not inside the task: under Dask the task
    # runs in another process, where the CLI's progress bar is not listening.
    for future in as_completed(futures):
        if future.state.is_completed():
            progress.shard_finished(future.result())
    failed = [f for f in futures if not f.state.is_completed()]
    summary = finalize_build.with_options(task_run_name=f"finalize-{dataset}")(out, config)
    if failed:
        raise RuntimeError(f"{len(failed)} shard(s) failed after retries; rerun to resume")
    return summary
