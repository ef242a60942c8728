"""The `build` Prefect flow: plan, one task per unfinished shard, then finalize and report.

Only wiring lives here; every step is a function of fgid.pipeline / fgid.finalize, which run
the same way without Prefect. What the run shows in the UI is built in flows/build_artifacts.py.
"""

from __future__ import annotations

import contextlib
import queue
import time

from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Failed

import storage
from fgid.card import write_card
from fgid.config import BuildConfig
from fgid.dataset import Dataset
from fgid.errors import FailureError, UsageError
from fgid.finalize import finalize
from fgid.inputs import PlannedShard
from fgid.models import leased_model_set
from fgid.pipeline import (
    prepare_output,
    process_shard,
    record_finished,
    shard_done,
    shard_stats,
    up_to_date,
)
from fgid.schema import shard_name
from fgid.status import recording
from flows.build_artifacts import BuildReport, artifact_key, dataset_name, publish_summary
from flows.retries import SHARD_RETRIES, describe
from flows.run_logs import send_fgid_logs
from flows.storage_secret import load_storage_secret

__all__ = ["artifact_key", "build", "shard_run_name", "tag_flow_run"]


class ShardsFailed(FailureError):
    """Some shards failed after their retries; the finished ones are kept for a rerun."""


# Only errors that can clear up are retried (flows/retries.py): a lost connection, a throttled
# object store.
@task(**SHARD_RETRIES, cache_policy=NO_CACHE, log_prints=False)
def build_shard(plan: PlannedShard, out_dir: str, config: BuildConfig) -> dict:
    """Process one shard, or report it as already done (a retry after a crash at commit).

    Returns its stats plus `task_seconds`: the whole task, model loading included, which is
    what Prefect shows as the task run's duration."""
    started = time.perf_counter()
    send_fgid_logs()  # this may be a Dask worker process of its own
    logger = get_run_logger()
    if shard_done(out_dir, plan.shard_id):
        logger.info("shard %05d already done", plan.shard_id)
        return shard_stats(out_dir, plan.shard_id)
    with leased_model_set(config) as models:
        stats = process_shard(Dataset(out_dir).shard_plan(plan.shard_id), out_dir, config, models)
    seconds = round(time.perf_counter() - started, 3)
    logger.info(
        "shard %05d: %d inputs, %d ok, %d rejected (%s) in %.1fs, %.1fs with model loading",
        plan.shard_id,
        stats["inputs"],
        stats["ok"],
        stats["rejected"],
        ", ".join(f"{k} {v}" for k, v in stats["reasons"].items()) or "none",
        stats["wall_seconds"],
        seconds,
    )
    return {**stats, "task_seconds": seconds}


@task(cache_policy=NO_CACHE)
def finalize_build(out_dir: str, config: BuildConfig, card: bool = True) -> dict:
    """Identities, duplicates and the summary; the dataset card when every shard is done."""
    summary = finalize(out_dir, config)
    get_run_logger().info(
        "%d samples, %d rejected, %d identities",
        summary["samples"],
        summary["rejected"],
        summary["identities"]["total"],
    )
    result = {"summary": summary, "card": write_card(out_dir, summary) if card else None}
    if card:
        record_finished(out_dir, summary)
    return result


def _run_name() -> str:
    params = flow_run.parameters
    return f"build-{storage.name(params['out'])}-{params['config'].models.set}"


def shard_run_name(dataset: str, shard_id: int) -> str:
    return f"{dataset} shard {shard_name(shard_id)}"


def run_tags(name: str, config: BuildConfig) -> list[str]:
    return ["fgid", "build", f"dataset:{name}", f"models:{config.models.set}"]


def tag_flow_run(tags: list[str], name: str | None = None) -> None:
    # Tags are known only once parameters are; the run already exists, so add them to it.
    update = {"name": name} if name else {}
    with get_client(sync_client=True) as client:
        # The server's tags, not the context's copy, which a first update leaves stale.
        now = client.read_flow_run(flow_run.id).tags
        client.update_flow_run(flow_run.id, tags=sorted({*now, *tags}), **update)


@flow(name="fgid-build", flow_run_name=_run_name, log_prints=False)
def build(
    inputs: list[str], out: str, config: BuildConfig | None = None, append: bool = False
) -> dict:
    """Build an FGID dataset from image folders, files and list files into `out`; with
    `append`, add the inputs it lacks to the dataset already there."""
    config = config or BuildConfig()
    load_storage_secret()  # deployments and `fgid serve` runs get credentials from the block too
    send_fgid_logs()
    name = dataset_name(out)
    tag_flow_run(run_tags(name, config))
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(Dataset(out).lock("fgid build"))
            plans: list[PlannedShard] = prepare_output(inputs, out, config, append)
        except UsageError as error:
            # The caller's mistake (other inputs or settings than the dataset's, a dataset in
            # use): one line in the run's log and state, no traceback; the caller still gets
            # the error itself (a flow's Failed state raises its data).
            get_run_logger().error("%s", error)
            return Failed(message=str(error), data=error)
        if append and up_to_date(out, plans):
            get_run_logger().info("nothing new: %s is up to date", out)
            return Dataset(out).summary()
        with recording(Dataset(out), plans, run_url=flow_run.ui_url):
            return _build_shards(plans, inputs, out, config, name)


def _build_shards(
    plans: list[PlannedShard], inputs: list[str], out: str, config: BuildConfig, name: str
) -> dict:
    logger = get_run_logger()
    todo = [p for p in plans if not shard_done(out, p.shard_id)]
    done_before = [shard_stats(out, p.shard_id) for p in plans if p not in todo]
    if done_before:
        # A rerun after a failure or a kill: say so in the run list, not only in its logs.
        tag_flow_run(["resume"], name=f"{_run_name()}-resume")
    logger.info(
        "%d inputs in %d shards planned, %d already done, %d to build",
        sum(p.size for p in plans),
        len(plans),
        len(done_before),
        len(todo),
    )
    report = BuildReport(name, plans, done_before)
    try:
        _run_shards(todo, out, config, report, run_tags(name, config))
    finally:
        report.close()
    failed = bool(report.failures)
    try:
        result = finalize_build.with_options(
            task_run_name=f"finalize-{name}", tags=run_tags(name, config)
        )(out, config, card=not failed)
        publish_summary(name, out, result["summary"], result["card"])
    except Exception as error:
        if not failed:
            raise
        # The shards' failure is the run's cause; a finalize that fails as well (the same full
        # disk) is reported beside it, never in its place.
        logger.warning("finalize after the failed shards failed too: %s", describe(error))
    report.shard_table()
    if failed:
        report.refresh("failed", force=True)
        report.failure(inputs, out, config, deployed=_deployed())
        causes = "; ".join(f"{shard_name(s)}: {e}" for s, e in sorted(report.failures.items()))
        raise ShardsFailed(
            f"{len(report.failures)} of {len(plans)} shard(s) failed ({causes}); "
            f"fix the cause and rerun to resume (artifact {artifact_key('failure', name)})"
        )
    report.refresh("completed", force=True)
    return result["summary"]


def _run_shards(
    todo: list[PlannedShard], out: str, config: BuildConfig, report: BuildReport, tags: list[str]
) -> None:
    """Submit every shard and follow them from this (the flow's) thread as they finish.

    Progress is reported here, as results arrive, and on a timer in between: under Dask a task
    runs in another process, whose batch events never reach this one."""
    finished: queue.SimpleQueue = queue.SimpleQueue()
    shard_of = {}
    for plan in todo:
        # Tagged like the flow run, so the task-run list filters by dataset. A tagged task run
        # takes and releases Prefect's tag-concurrency lease: measured 0.3-0.6 s per task run
        # on a 2-core machine (0.01 s untagged), under 1% of a default 1000-input shard.
        future = build_shard.with_options(
            task_run_name=shard_run_name(report.name, plan.shard_id), tags=tags
        ).submit(plan, out, config)
        shard_of[future] = plan.shard_id
        future.add_done_callback(finished.put)
    for _ in todo:
        while True:
            try:
                future = finished.get(timeout=report.seconds_to_next_update())
                break
            except queue.Empty:
                report.refresh()
        future.wait()
        if future.state.is_completed():
            report.shard_built(future.result())
        else:
            report.shard_failed(shard_of[future], _cause(future))


def _deployed() -> bool:
    """Started by a deployment (e.g. `fgid serve`), itself or as the subflow of one."""
    from prefect.runtime import deployment

    return bool(deployment.id or flow_run.parent_deployment_id)


def _cause(future) -> str:
    error = future.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        return describe(error)
    return future.state.message or future.state.name
