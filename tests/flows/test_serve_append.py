"""`fgid serve --append`: every scheduled run adds what is new to one dataset."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.serve import build_deployment

ROOT = Path(__file__).resolve().parents[2]

# One scheduled run as the served deployment starts it: the flow the deployment names, called
# with the deployment's parameters, on the test's Prefect server.
RUN = """
import json, sys, time
from fgid.config import BuildConfig
from flows.serve import build_deployment, scheduled_build
args = json.loads(sys.argv[1])
deployment = build_deployment(args["inputs"], args["out"], BuildConfig(**args["config"]),
                              name="append", interval=3600, append=True)
if args["register"]:
    deployment.apply()
started = time.perf_counter()
summary = scheduled_build(**deployment.parameters)
print(json.dumps({"samples": summary["samples"], "seconds": time.perf_counter() - started}))
"""


def test_append_deployment_parameters(lite_config, tmp_path):
    d = build_deployment(["photos"], tmp_path / "fgid", lite_config, name="x", cron="0 2 * * *",
                         append=True)  # fmt: skip
    assert d.parameters["append"] is True
    assert d.parameters["out"] == str(tmp_path / "fgid")
    assert "appended to" in d.description
    assert (
        build_deployment(["p"], "o", lite_config, name="x", interval=60).parameters["append"]
        is False
    )
    with pytest.raises(ValueError, match="drop \\{date\\}"):
        build_deployment(["photos"], "data/fgid-{date}", name="x", interval=60, append=True)


async def deployment_parameters(api_url: str) -> dict:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api_url) as client:
        deployment = await client.read_deployment_by_name("fgid-scheduled-build/append")
        return deployment.parameters


@pytest.mark.slow
def test_scheduled_runs_append_to_one_dataset(prefect_server, demo_inputs, tmp_path):
    folder, out = tmp_path / "photos", tmp_path / "fgid"
    folder.mkdir()
    names = sorted(p.name for p in demo_inputs.iterdir())
    config = {"models": {"set": "lite"}, "shard_size": 4, "batch_size": 4}
    results = []
    for step, batch in enumerate([names[:4], names[4:], []]):
        for name in batch:
            shutil.copy(demo_inputs / name, folder / name)
        args = {"inputs": [str(folder)], "out": str(out), "config": config, "register": not step}
        done = subprocess.run(
            [sys.executable, "-c", RUN, json.dumps(args)],
            cwd=ROOT,
            env=prefect_server.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results.append((json.loads(done.stdout.strip().splitlines()[-1]), done.stderr))
        if step == 1:
            shards = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    params = asyncio.run(deployment_parameters(prefect_server.api_url))
    assert params["append"] is True and params["out"] == str(out)
    records = [json.loads(p.read_text()) for p in sorted((out / "builds").glob("*.json"))]
    assert [(r["kind"], r["inputs_added"]) for r in records] == [("build", 4), ("append", 6)]
    assert results[1][0]["samples"] > results[0][0]["samples"]
    # The third run found nothing new: it said so, changed no file and did no build work.
    (last, log) = results[2]
    assert "nothing new" in log and last["samples"] == results[1][0]["samples"]
    assert shards == {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    assert "finalize" not in log
