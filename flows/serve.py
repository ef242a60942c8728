"""Scheduled builds: serve a deployment of the build on a cron or interval schedule."""

from __future__ import annotations

import asyncio
import datetime as dt
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
from flows.build import build

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


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return f"scheduled-{storage.name(_scheduled_out(params['out'], params['timezone']))}"


@flow(name="fgid-scheduled-build", flow_run_name=_run_name, log_prints=False)
def scheduled_build(
    inputs: list[str], out: str, config: BuildConfig | None = None, timezone: str = "UTC"
) -> dict:
    """Run the fgid-build flow into `out`, `{date}`/`{datetime}` taken from the scheduled time."""
    config = config or BuildConfig()
    runner = ThreadPoolTaskRunner(max_workers=config.workers)
    return build.with_options(task_runner=runner)(
        inputs=inputs, out=_scheduled_out(out, timezone), config=config
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
) -> RunnerDeployment:
    """The deployment `serve_build` serves: exactly one of `cron` or `interval` (seconds)."""
    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron or interval")
    if interval is not None and interval <= 0:
        raise ValueError(f"interval must be positive seconds, got {interval}")
    try:
        ZoneInfo(timezone)  # an unknown zone fails here, not at the first run
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}; e.g. UTC, Europe/Paris") from None
    if cron is not None:
        schedule = Cron(cron, timezone=timezone)
    else:
        schedule = Interval(dt.timedelta(seconds=interval), timezone=timezone)
    config = config or BuildConfig()
    return scheduled_build.to_deployment(
        name=name,
        schedule=schedule,
        parameters={
            "inputs": [_absolute(str(i)) for i in inputs],
            "out": _absolute(str(out)),
            "config": config.model_dump(mode="json"),
            "timezone": timezone,
        },
        # One build at a time, also across processes: a run that comes due while a build is
        # running is cancelled, not queued, so a slow build never piles up a backlog and two
        # runs never write one folder at once.
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
        ),
        tags=["fgid"],
        description=f"fgid build of {len(inputs)} input(s) into {out}",
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
    await runner.aadd_deployment(deployment)
    if stop.is_set():
        return
    async with asyncio.TaskGroup() as group:
        group.create_task(runner.start())
        await stop.wait()
        while not runner.started:  # astop refuses a runner that is still starting
            await asyncio.sleep(0.1)
        await runner.astop()


def serve_build(
    inputs: list[str],
    out: str,
    config: BuildConfig | None = None,
    *,
    name: str = "fgid-build",
    cron: str | None = None,
    interval: float | None = None,
    timezone: str = "UTC",
) -> None:
    """Serve a scheduled build from this process until SIGINT or SIGTERM."""
    deployment = build_deployment(
        inputs, out, config, name=name, cron=cron, interval=interval, timezone=timezone
    )
    print(
        f"Serving {deployment.flow_name}/{deployment.name}: {len(inputs)} input(s) -> {out}, "
        f"{f'cron {cron!r}' if cron else f'every {interval:g}s'} ({timezone}). Ctrl-C stops.\n"
        f"Run it now: prefect deployment run '{deployment.flow_name}/{deployment.name}'",
        flush=True,
    )
    asyncio.run(_serve(deployment))
