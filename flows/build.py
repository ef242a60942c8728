"""The `build` Prefect flow: plan, one retried task per unfinished shard, then finalize.

Only wiring lives here; every step is a function of fgid.pipeline / fgid.finalize, which run
the same way without Prefect.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

import storage
from fgid import progress
from fgid.config import BuildConfig
from fgid.finalize import finalize
from fgid.inputs import ShardPlan
from fgid.models import leased_model_set
from fgid.pipeline import prepare_output, process_shard, shard_done, shard_stats
from fgid.report import summary_markdown, summary_table


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, log_prints=False)
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
    progress.shard_finished(stats)
    return stats


@task(cache_policy=NO_CACHE)
def finalize_build(out_dir: str, config: BuildConfig) -> dict:
    summary = finalize(out_dir, config)
    name = storage.name(out_dir).lower().replace("_", "-")
    create_markdown_artifact(
        summary_markdown(summary, out_dir),
        key=f"fgid-summary-{name}"[:100],
        description="FGID build summary",
    )
    create_table_artifact(summary_table(summary), description="FGID build counts")
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


@flow(name="fgid-build", flow_run_name=_run_name, log_prints=False)
def build(inputs: list[str], out: str, config: BuildConfig | None = None) -> dict:
    """Build an FGID dataset from image folders, files and list files into `out`."""
    config = config or BuildConfig()
    logger = get_run_logger()
    plans: list[ShardPlan] = prepare_output(inputs, out, config)
    todo = [p for p in plans if not shard_done(out, p.shard_id)]
    logger.info(
        "%d shards planned, %d already done, %d to build",
        len(plans),
        len(plans) - len(todo),
        len(todo),
    )
    futures = [
        build_shard.with_options(task_run_name=f"shard-{p.shard_id:05d}").submit(p, out, config)
        for p in todo
    ]
    wait(futures)
    failed = [f for f in futures if f.state.is_failed()]
    summary = finalize_build.with_options(task_run_name=f"finalize-{storage.name(out)}")(
        out, config
    )
    if failed:
        raise RuntimeError(f"{len(failed)} shard(s) failed after retries; rerun to resume")
    return summary
