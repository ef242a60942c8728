"""Scheduled builds: serve a deployment of the build on a cron or interval schedule."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect import flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.types.entrypoint import EntrypointType

import storage
from fgid.config import BuildConfig
from flows.build import build, run_tags
from flows.build_artifacts import artifact_key, dataset_name
from storage.credentials import check_url

PLACEHOLDERS = {"{date}": "%Y-%m-%d", "{datetime}": "%Y-%m-%d_%H%M%S"}


def expand_out(out: str, when: dt.datetime) -> str:
    """Fill `{date}` / `{datetime}` in an output path from `when` (no colons: S3 and Windows)."""
    for token, fmt in PLACEHOLDERS.items():
        out = out.replace(token, when.strftime(fmt))
    return out


def _scheduled_out(out: str, timezone: str) -> str:
    from prefect.runtime import flow_run

    # The scheduled time, not the clock: a retried or late run resolves to the same folder,
    # so it resumes the build of its slot instead of starting another one.
    return expand_out(out, flow_run.scheduled_start_time.astimezone(ZoneInfo(timezone)))


def scheduled_run_name(out: str, timezone: str, when: dt.datetime) -> str:
    """`scheduled-fgid-2026-11-03`: the folder the run builds, known as soon as it is planned."""
    return f"scheduled-{storage.name(expand_out(out, when.astimezone(ZoneInfo(timezone))))}"


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return scheduled_run_name(params["out"], params["timezone"], flow_run.scheduled_start_time)


@flow(name="fgid-scheduled-build", flow_run_name=_run_name, log_prints=False)
def scheduled_build(
    inputs: list[str],
    out: str,
    config: BuildConfig | None = None,
    timezone: str = "UTC",
    append: bool = False,
) -> dict:
    """Run the fgid-build flow into `out`, `{date}`/`{datetime}` taken from the scheduled time;
    with `append`, add what is new in the inputs to the one dataset at `out`."""
    config = config or BuildConfig()
    runner = ThreadPoolTaskRunner(max_workers=config.workers)
    state = build.with_options(task_runner=runner)(
        inputs=inputs,
        out=_scheduled_out(out, timezone),
        config=config,
        append=append,
        return_state=True,
    )
    _link_build_run(state, out)
    return state.result()


def _link_build_run(state, out: str) -> None:
    # The build's artifacts hang off its own (child) run; point at it from this one, which is
    # what the deployment's run list shows.
    from prefect import get_client
    from prefect.artifacts import create_link_artifact
    from prefect.utilities.urls import url_for

    run_id = state.state_details.flow_run_id
    url = url_for("flow-run", obj_id=run_id) if run_id else None
    if url:
        with get_client(sync_client=True) as client:
            run_name = client.read_flow_run(run_id).name
        create_link_artifact(
            url,
            link_text=f"{run_name} ({state.name})",
            key=artifact_key("build-run", dataset_name(out)),
            description="The fgid-build run of this scheduled build: progress, shards, summary",
        )


def _absolute(path: str) -> str:
    # The deployment outlives this shell: store paths that do not depend on its directory.
    return path if storage.is_remote(path) else str(Path(path).expanduser().absolute())


def build_deployment(
    inputs: list[str],
    out: str,
    config: BuildConfig | None = None,
    *,
    name: str = "fgid-build",
    cron: str | None = None,
    interval: float | None = None,
    timezone: str = "UTC",
    append: bool = False,
) -> RunnerDeployment:
    """The deployment `serve_build` serves: exactly one of `cron` or `interval` (seconds).
    With `append`, every run adds what is new in the inputs to the one dataset at `out`.

    Every input, the output and the labels path are checked for embedded credentials first:
    the deployment's parameters and description are stored on the Prefect server."""
    config = config or BuildConfig()
    for url in [*map(str, inputs), str(out), *([config.labels] if config.labels else [])]:
        check_url(url)  # the message never repeats the URL
    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron or interval")
    if interval is not None and interval <= 0:
        raise ValueError(f"interval must be positive seconds, got {interval}")
    if append and any(token in str(out) for token in PLACEHOLDERS):
        raise ValueError("--append adds every run to one dataset: drop {date} from --out")
    try:
        ZoneInfo(timezone)  # an unknown zone fails here, not at the first run
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}; e.g. UTC, Europe/Paris") from None
    if cron is not None:
        schedule = Cron(cron, timezone=timezone)
    else:
        schedule = Interval(dt.timedelta(seconds=interval), timezone=timezone)
    return scheduled_build.to_deployment(
        name=name,
        schedule=schedule,
        parameters={
            "inputs": [_absolute(str(i)) for i in inputs],
            "out": _absolute(str(out)),
            "config": config.model_dump(mode="json"),
            "timezone": timezone,
            "append": append,
        },
        # One build at a time, also across processes: a run that comes due while a build is
        # running is cancelled, not queued, so a slow build never piles up a backlog and two
        # runs never write one folder at once.
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
        ),
        # Runs take the deployment's tags when the scheduler creates them, before they start.
        tags=[*run_tags(dataset_name(out), config), "scheduled"],
        description=f"fgid build of {len(inputs)} input(s) {'appended to' if append else 'into'} "
        f"{out}",
        # A module path works from any directory where fgid is installed.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


async def _serve(deployment: RunnerDeployment) -> None:
    from prefect.runner import Runner

    # Claim a run only once it is due: a prefetched run would hold the one-build slot while it
    # waits, so a run due just after a build ends would be cancelled. Starting up to one poll
    # (PREFECT_RUNNER_POLL_FREQUENCY, 10 s) late costs a build nothing.
    runner = Runner(name=f"fgid-serve-{deployment.name}", prefetch_seconds=0)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def request_stop(*_: object) -> None:
        if stop.is_set():
            raise SystemExit(1)  # a second signal: leave now, e.g. when the server is gone
        loop.call_soon_threadsafe(stop.set)

    # Prefect's own SIGTERM handler exits without stopping a running build, which then stays
    # "Running" on the server forever. Both signals instead cancel running builds (their
    # finished shards stay and a rerun resumes them), then pause the schedule.
    runner.handle_sigterm = request_stop  # Runner.start installs it for SIGTERM
    signal.signal(signal.SIGTERM, request_stop)
    loop.add_signal_handler(signal.SIGINT, request_stop)
    deployment_id = await runner.aadd_deployment(deployment)
    if stop.is_set():
        return
    async with asyncio.TaskGroup() as group:
        group.create_task(runner.start())
        naming = group.create_task(name_scheduled_runs(deployment_id, deployment.parameters))
        await stop.wait()
        naming.cancel()
        while not runner.started:  # astop refuses a runner that is still starting
            await asyncio.sleep(0.1)
        await runner.astop()


async def name_scheduled_runs(deployment_id, parameters: dict, every: float = 5.0) -> None:
    """Give each scheduled run its name as soon as the scheduler creates it.

    The server names a deployment's runs at random ("bold-okapi"); the flow's own name
    (`scheduled-fgid-2026-11-03`) would appear only once a run starts, leaving the upcoming
    runs in the UI anonymous until then."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    out, timezone = parameters["out"], parameters["timezone"]
    scheduled = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
    )
    while True:
        try:
            async with get_client() as client:
                runs = await client.read_flow_runs(
                    flow_run_filter=scheduled,
                    deployment_filter=DeploymentFilter(id={"any_": [deployment_id]}),
                )
                for run in runs:
                    when = run.expected_start_time or run.next_scheduled_start_time
                    if when is None or run.name.startswith("scheduled-"):
                        continue
                    name = scheduled_run_name(out, timezone, when)
                    await client.update_flow_run(run.id, name=name)
        except Exception as error:  # noqa: BLE001 - names are cosmetic; never stop serving
            logging.getLogger(__name__).debug("naming scheduled runs: %s", error)
        await asyncio.sleep(every)


def serve_build(
    inputs: list[str],
    out: str,
    config: BuildConfig | None = None,
    *,
    name: str = "fgid-build",
    cron: str | None = None,
    interval: float | None = None,
    timezone: str = "UTC",
    append: bool = False,
) -> None:
    """Serve a scheduled build from this process until SIGINT or SIGTERM."""
    deployment = build_deployment(
        inputs,
        out,
        config,
        name=name,
        cron=cron,
        interval=interval,
        timezone=timezone,
        append=append,
    )
    print(
        f"Serving {deployment.flow_name}/{deployment.name}: {len(inputs)} input(s) -> {out}, "
        f"{f'cron {cron!r}' if cron else f'every {interval:g}s'} ({timezone}). Ctrl-C stops.\n"
        f"Run it now: prefect deployment run '{deployment.flow_name}/{deployment.name}'",
        flush=True,
    )
    asyncio.run(_serve(deployment))
