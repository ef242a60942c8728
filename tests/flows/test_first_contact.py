"""A newcomer's first build: a fresh Prefect home on a busy machine, then a second build."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.local_server import read_state, running_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BURN = "import time\nend = time.time() + 900\nwhile time.time() < end: pass\n"


def fgid(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )  # fmt: skip


@pytest.fixture()
def busy_machine():
    """Two CPU-bound processes beside the test, as on a laptop doing other work; calling the
    fixture's value stops them early."""
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(2)]

    def stop() -> None:
        for proc in burners:
            proc.kill()
            proc.wait()

    yield stop
    stop()


def test_demo_build_from_a_fresh_prefect_home_on_a_busy_machine(
    busy_machine, demo_inputs, prefect_home, tmp_path
):
    env = {**os.environ, "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    args = ["build", str(demo_inputs), "--models", "lite", "--shard-size", "4"]
    first = fgid([*args, "--out", str(tmp_path / "first")], env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Starting a local Prefect server" in first.stderr
    assert "Traceback" not in first.stderr
    server = running_server(prefect_home)
    assert server is not None, "the server is kept for later runs"
    assert f"Prefect UI: {server.ui_url}" in first.stderr
    busy_machine()  # the start-up under load is what was at stake

    # The second build reuses that server instead of waiting for a new one.
    started = time.monotonic()
    second = fgid([*args, "--out", str(tmp_path / "second")], env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Starting a local Prefect server" not in second.stderr
    assert read_state(prefect_home).pid == server.pid
    assert (tmp_path / "second" / "summary.json").exists()
    print(f"second build, server reused: {time.monotonic() - started:.1f} s")

    stopped = fgid(["server", "stop"], env)
    assert stopped.returncode == 0 and f"pid {server.pid}" in stopped.stderr
    assert running_server(prefect_home) is None


def test_a_server_that_cannot_start_is_one_line_with_what_to_do(demo_inputs, tmp_path):
    # A Prefect home that is a file: the server cannot create its database and exits.
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    env = {**os.environ, "PREFECT_HOME": str(blocked / "home")}
    env.pop("PREFECT_API_URL", None)
    args = ["build", str(demo_inputs), "--out", str(tmp_path / "o"), "--models", "lite"]
    done = fgid(args, env)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "--no-prefect" in error[0] and "PREFECT_API_URL" in error[0]


def test_an_unreachable_prefect_api_url_is_one_line(demo_inputs, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # the discard port
    done = fgid(["build", str(demo_inputs), "--out", str(tmp_path / "o"), "--models", "lite"], env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "does not answer" in done.stderr and "--no-prefect" in done.stderr
