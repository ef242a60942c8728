"""Scheduled builds: a served deployment on a real Prefect server runs the build on its own."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.serve import build_deployment, expand_out

ROOT = Path(__file__).resolve().parents[2]

# What `fgid serve` does, in a process of its own as a user runs it.
SERVE = """
import json, sys
from fgid.config import BuildConfig
from flows.serve import serve_build
args = json.loads(sys.argv[1])
serve_build(args["inputs"], args["out"], BuildConfig(**args["config"]), name=args["name"],
            interval=args["interval"])
"""

# The server plans runs and the runner polls for them every second, not every 5-60 s.
FAST_SCHEDULING = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",
}


def test_expand_out_uses_the_given_time():
    when = dt.datetime(2026, 11, 3, 1, 2, 3)
    assert expand_out("data/fgid-{date}", when) == "data/fgid-2026-11-03"
    assert expand_out("s3://b/fgid-{datetime}/x", when) == "s3://b/fgid-2026-11-03_010203/x"
    assert expand_out("data/fixed", when) == "data/fixed"


def test_deployment_rejects_bad_schedules():
    with pytest.raises(ValueError, match="exactly one"):
        build_deployment(["in"], "out", name="x")
    with pytest.raises(ValueError, match="exactly one"):
        build_deployment(["in"], "out", name="x", cron="0 2 * * *", interval=60)
    with pytest.raises(ValueError, match="positive"):
        build_deployment(["in"], "out", name="x", interval=0)
    with pytest.raises(ValueError, match="cron"):
        build_deployment(["in"], "out", name="x", cron="every night")
    with pytest.raises(ValueError, match="time zone"):
        build_deployment(["in"], "out", name="x", interval=60, timezone="Mars/Base")


def test_deployment_carries_schedule_and_parameters(lite_config):
    d = build_deployment(
        ["photos"], "data/fgid-{date}", lite_config, name="nightly", cron="0 2 * * *"
    )
    assert d.name == "nightly" and d.flow_name == "fgid-scheduled-build"
    assert d.entrypoint == "flows.serve.scheduled_build"
    assert [s.schedule.cron for s in d.schedules] == ["0 2 * * *"]
    assert d.parameters["inputs"] == [str(Path("photos").absolute())]
    assert d.parameters["out"] == str(Path("data/fgid-{date}").absolute())
    assert d.parameters["config"]["models"]["set"] == "lite"
    assert d.concurrency_limit == 1
    assert d.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    # Runs take these when the scheduler creates them: the dataset's name without the date.
    assert set(d.tags) == {"fgid", "build", "scheduled", "dataset:fgid", "models:lite"}


SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
CREDENTIAL_URLS = [
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/photos",
    f"simplecache::s3://AKIAEXAMPLE:{SECRET}@bucket/photos",
    f"https://host/photos.txt?X-Amz-Signature={SECRET}",
]


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
def test_deployment_refuses_urls_with_credentials_before_it_is_built(url, lite_config):
    labelled = lite_config.model_copy(update={"labels": url})
    for inputs, out, config in [([url], "out", None), (["in"], url, None), (["in"], "o", labelled)]:
        with pytest.raises(ValueError, match="credentials refused") as caught:
            build_deployment(inputs, out, config, name="x", interval=60)
        assert SECRET not in str(caught.value)


# Registers a deployment as `fgid serve` would (apply = what serving does first), then tries
# one with credentials in each place; prints what the server ended up holding.
REGISTER = """
import asyncio, json, sys
from fgid.config import BuildConfig
from flows.serve import build_deployment
args = json.loads(sys.argv[1])
build_deployment(args["inputs"], args["out"], name="clean", interval=3600).apply()
refused = []
for inputs, out, labels in args["attempts"]:
    try:
        deployment = build_deployment(inputs, out, BuildConfig(labels=labels), name="leaky",
                                      interval=3600)
        deployment.apply()
    except ValueError as error:
        refused.append(str(error))

async def stored():
    from prefect.client.orchestration import get_client
    async with get_client() as client:
        return [d.model_dump(mode="json") for d in await client.read_deployments()]

print(json.dumps({"refused": refused, "deployments": asyncio.run(stored())}))
"""


@pytest.mark.slow
def test_no_credential_reaches_the_prefect_server(prefect_server, tmp_path):
    url = CREDENTIAL_URLS[1]
    attempts = [[[url], str(tmp_path / "o"), None], [["in"], url, None], [["in"], "o", url]]
    args = {"inputs": [str(tmp_path)], "out": str(tmp_path / "o"), "attempts": attempts}
    done = subprocess.run(
        [sys.executable, "-c", REGISTER, json.dumps(args)],
        cwd=ROOT,
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET not in done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["refused"]) == 3
    # The server is reachable and holds what was applied (other tests' deployments share it).
    ours = {d["name"]: d for d in result["deployments"] if d["name"] in ("clean", "leaky")}
    assert list(ours) == ["clean"]
    assert ours["clean"]["parameters"]["inputs"] == [str(tmp_path)]


def test_prefect_yaml_points_at_the_real_flow():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    from flows.serve import scheduled_build

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(spec)  # the shape `prefect deploy` reads
    (deployment,) = spec["deployments"]
    path, func = deployment["entrypoint"].split(":")
    loaded = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
    assert loaded.name == scheduled_build.name == "fgid-scheduled-build"
    assert loaded.fn.__code__.co_code == scheduled_build.fn.__code__.co_code
    # The parameters coerce into the flow's types, config included.
    params = scheduled_build.validate_parameters(deployment["parameters"])
    assert params["config"].models.set == "full" and params["out"] == "data/fgid-{date}"
    assert deployment["work_pool"]["name"] == "fgid"
    assert [s["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


DEPLOYMENT = "fgid-scheduled-build/every-few-seconds"
LIMIT_REACHED = "Deployment concurrency limit reached."


async def poll_runs(api_url: str, until, timeout: float):
    """The deployment and its runs (newest first) once `until(runs)` holds."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import DeploymentFilter

    async with PrefectClient(api=api_url) as client:
        deadline = time.monotonic() + timeout
        runs = []
        while time.monotonic() < deadline:
            try:
                dep = await client.read_deployment_by_name(DEPLOYMENT)
            except Exception:  # noqa: BLE001 - not registered yet
                await asyncio.sleep(1)
                continue
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": [dep.id]})
            )
            if until(runs):
                return dep, runs
            await asyncio.sleep(1)
        raise TimeoutError(f"{DEPLOYMENT}: {[(r.name, r.state_name) for r in runs]}")


async def run_details(api_url: str, run_id):
    """A run's state names in order and its child flow runs."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter

    async with PrefectClient(api=api_url) as client:
        history = await client.read_flow_run_states(run_id)
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [run_id]})
        )
        return [s.name for s in history], children


async def run_artifacts(api_url: str, run_id):
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter

    async with PrefectClient(api=api_url) as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id={"any_": [run_id]})
        )
        return [a for a in found if a.type]  # untyped ones are Prefect's result records


def named_while_scheduled(runs):
    waiting = [r for r in runs if r.state and r.state.is_scheduled()]
    return waiting and all(r.name.startswith("scheduled-fgid-") for r in waiting)


def completed(runs):
    return [r for r in runs if r.state and r.state.is_completed()]


def running(runs):
    return [r for r in runs if r.state and r.state.is_running()]


@pytest.mark.slow
def test_served_deployment_runs_on_its_schedule(demo_inputs, tmp_path):
    from prefect_server import PrefectServer

    home = tmp_path / "prefect-home"
    home.mkdir()
    server = PrefectServer(home, extra_env=FAST_SCHEDULING).start()
    serve_log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - lives with the process
    args = {
        "inputs": [str(demo_inputs)],
        "out": str(tmp_path / "fgid-{datetime}"),
        "config": {"models": {"set": "lite"}, "shard_size": 4, "batch_size": 4},
        "name": "every-few-seconds",
        "interval": 5,  # shorter than a build: runs come due while one is running
    }
    serve = subprocess.Popen(
        [sys.executable, "-c", SERVE, json.dumps(args)],
        cwd=ROOT,
        env=server.env,
        stdout=serve_log,
        stderr=subprocess.STDOUT,
    )
    api = server.api_url
    try:
        dep, runs = asyncio.run(poll_runs(api, completed, timeout=150))
        # Upcoming runs carry their folder's name and the tags before they start.
        _, upcoming = asyncio.run(poll_runs(api, named_while_scheduled, timeout=30))
        (run,) = completed(runs)
        history, children = asyncio.run(run_details(api, run.id))
        parent_artifacts = asyncio.run(run_artifacts(api, run.id))
        # The next due run starts once the first is done; stop the serve process mid-build.
        _, runs = asyncio.run(poll_runs(api, running, timeout=60))
        (interrupted,) = running(runs)
        # Stop the serve process while the server is up (it cannot pause its schedule otherwise).
        serve.send_signal(signal.SIGTERM)
        returncode = serve.wait(timeout=60)
        dep_after, runs_after = asyncio.run(poll_runs(api, lambda runs: True, timeout=10))
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        server.stop()
        serve_log.close()
    log = (tmp_path / "serve.log").read_text(errors="replace")

    # The run came from the schedule: created by the scheduler, not triggered by hand.
    assert run.deployment_id == dep.id
    assert run.auto_scheduled, run
    assert history[0] == "Scheduled" and history[-1] == "Completed", history
    assert run.parameters["out"] == args["out"]
    # It ran the fgid-build flow into the folder its scheduled time names.
    out = Path(expand_out(args["out"], run.expected_start_time.astimezone(dt.UTC)))
    assert len(children) == 1 and children[0].state.is_completed()
    assert children[0].parameters["out"] == str(out)
    assert run.name == f"scheduled-{out.name}" and children[0].name == f"build-{out.name}-lite"
    assert {"scheduled", "dataset:fgid", "models:lite"} <= set(run.tags)
    assert [a.key for a in parent_artifacts] == ["fgid-build-run-fgid"]
    assert f"[build-{out.name}-lite (Completed)](" in parent_artifacts[0].data
    waiting = [r for r in upcoming if r.state.is_scheduled()]
    assert all({"scheduled", "dataset:fgid"} <= set(r.tags) for r in waiting)
    for upcoming_run in waiting:
        when = upcoming_run.expected_start_time.astimezone(dt.UTC)
        assert upcoming_run.name == f"scheduled-{Path(expand_out(args['out'], when)).name}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["samples"] == 8
    assert len(list((out / "shards").glob("*.tar"))) == 3

    # Runs that came due during the build were cancelled, not queued behind it.
    states = {r.id: r.state for r in runs_after}
    skipped = [s for s in states.values() if s.is_cancelled() and s.message == LIMIT_REACHED]
    assert skipped, [(s.name, s.message) for s in states.values()]
    assert not [s for s in states.values() if s.is_failed() or s.is_crashed()]

    # SIGTERM is a clean stop: exit status 0, the running build cancelled (not left "Running"
    # on the server), the schedule paused so no backlog builds up while nothing serves it.
    assert returncode == 0, log[-3000:]
    assert states[interrupted.id].is_cancelled(), states[interrupted.id]
    assert not [s for s in states.values() if s.is_running()]
    assert dep_after.paused
