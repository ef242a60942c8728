"""The `fgid build` command as users run it, on a real Prefect server."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

pytestmark = pytest.mark.slow


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )


def tar_bytes(out: Path) -> dict[str, bytes]:
    files = sorted((out / "shards").glob("*.tar")) + sorted((out / "shards").glob("*.parquet"))
    return {p.name: p.read_bytes() for p in files}


async def flow_run_report(api_url: str, flow_name: str, tag: str):
    """The runs of `flow_name` tagged `tag` (the server is shared with other tests' builds),
    their task runs and the artifacts, once the server has recorded them."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterTags,
        TaskRunFilter,
    )

    async with PrefectClient(api=api_url) as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
        )
        tasks, artifacts = [], []
        for _ in range(60):  # the server records task runs asynchronously
            tasks = await client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id={"any_": [r.id for r in runs]})
            )
            ours = {r.id for r in runs}
            artifacts = [a for a in await client.read_artifacts() if a.flow_run_id in ours]
            if len(tasks) >= 4 and len(artifacts) >= 9 and all(t.state.is_final() for t in tasks):
                break
            await asyncio.sleep(0.5)
        return runs, tasks, artifacts


def test_build_flow_on_a_real_server(prefect_server, demo_inputs, tmp_path):
    out = tmp_path / "celeb-demo"
    args = ["build", str(demo_inputs), "--out", str(out), "--models", "lite", "--shard-size", "4"]
    done = run_cli(args, env=prefect_server.env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 00000: 4 inputs" in done.stderr + done.stdout

    runs, tasks, artifacts = asyncio.run(
        flow_run_report(prefect_server.api_url, "fgid-build", "dataset:celeb-demo")
    )
    assert [r.name for r in runs] == ["build-celeb-demo-lite"]
    assert runs[0].state.is_completed()
    run_tags = {"fgid", "build", "dataset:celeb-demo", "models:lite"}
    assert run_tags <= set(runs[0].tags)
    names = sorted(t.name for t in tasks)
    assert names == [f"celeb-demo shard {i:05d}" for i in range(3)] + ["finalize-celeb-demo"]
    assert all(t.state.is_completed() for t in tasks)
    assert all(set(t.tags) == run_tags for t in tasks if "shard" in t.name)
    # Every artifact is keyed and on the flow run itself, none on the finalize task.
    shown = [a for a in artifacts if a.type]  # untyped ones are Prefect's result records
    assert all(a.key and a.flow_run_id == runs[0].id and not a.task_run_id for a in shown)
    keys = [a.key for a in shown]
    assert {"fgid-summary-celeb-demo", "fgid-card-celeb-demo", "fgid-counts-celeb-demo"} <= set(
        keys
    )
    bar = next(a for a in artifacts if a.key == "fgid-progress-celeb-demo")
    assert bar.data == 100.0 and bar.description.startswith("completed: 3 of 3 shards, 10 of 10")
    shards = json.loads(next(a for a in artifacts if a.key == "fgid-shards-celeb-demo").data)
    assert [row["shard"] for row in shards] == ["00000", "00001", "00002"]
    assert sum(row["kept"] for row in shards) == 8 and shards[0]["seconds (with model load)"] > 0
    link = next(a for a in artifacts if a.key == "fgid-output-celeb-demo")
    assert link.data.endswith(f"]({out.as_uri()})")
    markdown = next(a for a in artifacts if a.key == "fgid-summary-celeb-demo")
    assert "Rejection reasons" in markdown.data and "no_face" in markdown.data
    card = next(a for a in artifacts if a.key == "fgid-card-celeb-demo")
    assert card.data.count("](data:image/png;base64,") >= 5
    assert (out / "card" / "README.md").exists() and len(list((out / "card").glob("*.png"))) == 6

    # Plain webdataset reads the flow's shards; they equal a plain-Python build's byte for byte.
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert len(list(wds.WebDataset(shards, shardshuffle=False))) == 8
    plain = tmp_path / "plain"
    done_plain = run_cli([*args[:3], str(plain), *args[4:], "--no-prefect"])
    assert done_plain.returncode == 0, done_plain.stderr[-3000:]
    assert tar_bytes(out) == tar_bytes(plain)

    # Rerunning the same command finds every shard done and rewrites none.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    time.sleep(0.01)
    again = run_cli(args, env=prefect_server.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 already done, 0 to build" in again.stderr + again.stdout
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}

    # Another setting on the same output is the user's mistake: one line, no traceback, and
    # the run says why it failed.
    other = run_cli([*args[:-1], "5"], env=prefect_server.env)
    said = other.stderr + other.stdout
    assert other.returncode == 2 and "Traceback" not in said, said[-3000:]
    assert [line for line in said.splitlines() if line.startswith("fgid: error:")] == [
        f"fgid: error: {out} was built with another configuration (shard_size 4 -> 5); use a new "
        "--out, or the settings of the first run"
    ]
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}


def test_inspect_prints_a_readable_summary(demo_inputs, tmp_path):
    out = tmp_path / "ds"
    built = run_cli(
        ["build", str(demo_inputs), "--out", str(out), "--models", "lite", "--no-prefect"]
    )
    assert built.returncode == 0, built.stderr[-3000:]
    shown = run_cli(["inspect", str(out)])
    assert shown.returncode == 0
    for text in ("samples kept", "no_face", "Age (estimated)", "caption:", "template caption"):
        assert text in shown.stdout, text
    missing = run_cli(["inspect", str(tmp_path)])
    assert missing.returncode == 2
    assert re.search(r"is not an? (finished )?fgid build", missing.stderr), missing.stderr
