"""A build killed with SIGKILL at any moment, then rerun, equals an uninterrupted build."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fgid.schema import SAMPLE_FIELDS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def command(inputs: Path, out: Path, prefect: bool) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "build",
        str(inputs),
        "--out",
        str(out),
        "--models",
        "lite",
        "--shard-size",
        "2",
        "--batch-size",
        "2",
    ]
    return args if prefect else [*args, "--no-prefect"]


def outputs(out: Path) -> dict[str, bytes]:
    shards = out / "shards"
    files = sorted(shards.glob("*.tar")) + sorted(shards.glob("*.parquet"))
    return {p.name: p.read_bytes() for p in files}


class TarWatcher(threading.Thread):
    """Reads every visible tar over and over while a build runs; a partial tar is an error."""

    def __init__(self, shards: Path) -> None:
        super().__init__(daemon=True)
        self.shards, self.stop, self.errors, self.reads = shards, threading.Event(), [], 0

    def run(self) -> None:
        while not self.stop.is_set():
            for path in sorted(self.shards.glob("*.tar")) if self.shards.exists() else []:
                try:
                    with tarfile.open(path) as tar:
                        names = [m.name for m in tar.getmembers()]
                        for member in tar.getmembers():
                            tar.extractfile(member).read()
                    if len(names) % len(SAMPLE_FIELDS):
                        self.errors.append(f"{path.name}: {len(names)} members")
                    self.reads += 1
                except FileNotFoundError:
                    pass  # replaced between glob and open
                except Exception as exc:  # noqa: BLE001
                    self.errors.append(f"{path.name}: {exc!r}")


def stats_count(out: Path) -> int:
    return len(list((out / "shards").glob("*.stats.json"))) if (out / "shards").exists() else 0


def writing_a_shard(out: Path) -> bool:
    """A shard's tar is open under its temporary name after at least one shard is done."""
    shards = out / "shards"
    return shards.exists() and stats_count(out) >= 1 and any(shards.glob(".*.tar.tmp-*"))


KILL_POINTS = {
    # right after planning, while the models load
    "while-loading-models": lambda out: (out / "build.json").exists(),
    "mid-shard": writing_a_shard,
    "after-1-shard": lambda out: stats_count(out) >= 1,
}


def run_and_kill(cmd: list[str], out: Path, env: dict, kill_when) -> None:
    """Start the build, SIGKILL it as soon as `kill_when(out)` holds, watching tars meanwhile."""
    watcher = TarWatcher(out / "shards")
    watcher.start()
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not kill_when(out):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    watcher.stop.set()
    watcher.join()
    assert watcher.errors == []
    # The kill must land before the build ends, or this test proves nothing.
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(demo_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "ds"
    subprocess.run(
        command(demo_inputs, out, prefect=False), cwd=ROOT, check=True, capture_output=True
    )
    return outputs(out)


@pytest.mark.parametrize("kill_point", sorted(KILL_POINTS))
def test_sigkill_then_rerun_matches_uninterrupted_build(
    reference, demo_inputs, tmp_path, kill_point
):
    out = tmp_path / "ds"
    cmd = command(demo_inputs, out, prefect=False)
    run_and_kill(cmd, out, dict(os.environ), KILL_POINTS[kill_point])
    finished_before = stats_count(out)
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert outputs(out) == reference
    assert not [p for p in out.rglob(".*") if p.is_file()], "temporary files left behind"
    index = pq.read_table(sorted(str(p) for p in (out / "shards").glob("*.parquet")))
    keys = index.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == len(list(demo_inputs.iterdir()))  # none lost, none twice
    # Shards finished before the kill were not rebuilt.
    assert f"in 5 shards planned, {5 - finished_before} to do" in rerun.stderr


def test_sigkill_of_a_prefect_build_resumes(reference, demo_inputs, tmp_path, prefect_server):
    out = tmp_path / "ds"
    cmd = command(demo_inputs, out, prefect=True)
    run_and_kill(cmd, out, prefect_server.env, lambda o: stats_count(o) >= 2)
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=prefect_server.env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert outputs(out) == reference
    assert "already done" in rerun.stderr + rerun.stdout


BASE = ["astronaut.png", "coffee (no face).png", "notes.jpg", "tom_hanks.png"]


def appended_outputs(out: Path) -> dict[str, bytes]:
    """What an append must reproduce exactly: shards, the plan and identities."""
    return {
        **outputs(out),
        **{n: (out / n).read_bytes() for n in ("plan.parquet", "identities.parquet")},
    }


@pytest.fixture(scope="module")
def append_base(demo_inputs, tmp_path_factory):
    """A finished build of BASE, after which the rest of the demo photos join its folder."""
    root = tmp_path_factory.mktemp("append-base")
    folder, out = root / "photos", root / "ds"
    folder.mkdir()
    for name in BASE:
        shutil.copy(demo_inputs / name, folder / name)
    subprocess.run(command(folder, out, prefect=False), cwd=ROOT, check=True, capture_output=True)
    for path in demo_inputs.iterdir():
        shutil.copy(path, folder / path.name)
    return folder, out


@pytest.fixture(scope="module")
def append_reference(append_base, tmp_path_factory):
    folder, base = append_base
    out = tmp_path_factory.mktemp("append-reference") / "ds"
    shutil.copytree(base, out)
    cmd = [*command(folder, out, prefect=False), "--append"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return appended_outputs(out)


def identities_rewritten(out: Path):
    before = (out / "identities.parquet").stat().st_mtime_ns
    return lambda o: (o / "identities.parquet").stat().st_mtime_ns != before


APPEND_KILL_POINTS = {
    "planned": lambda out: (out / "builds" / "0001.json").exists(),
    "mid-shard": lambda out: stats_count(out) >= 3 and any((out / "shards").glob(".*.tar.tmp-*")),
    "finalizing": identities_rewritten,  # identities written, card and history not yet
}


@pytest.mark.parametrize("kill_point", sorted(APPEND_KILL_POINTS))
def test_sigkill_during_an_append_then_rerun_matches(
    append_base, append_reference, tmp_path, kill_point
):
    folder, base = append_base
    out = tmp_path / "ds"
    shutil.copytree(base, out)
    old = outputs(out)
    when = APPEND_KILL_POINTS[kill_point]
    cmd = [*command(folder, out, prefect=False), "--append"]
    run_and_kill(cmd, out, dict(os.environ), when(out) if kill_point == "finalizing" else when)
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = appended_outputs(out)
    assert result == append_reference
    assert {k: result[k] for k in old} == old  # the first build's shards never changed
    records = json_records(out)
    assert [(r["kind"], r["status"]) for r in records] == [("build", "done"), ("append", "done")]
    assert records[1]["inputs_added"] == len(list(folder.iterdir())) - len(BASE)


def json_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "builds").glob("*.json"))]
