"""Progress as a user sees it: the bar moves per batch; `fgid status` of a running, killed,
resumed build."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fgid.progress import Tracker

ROOT = Path(__file__).resolve().parents[2]
FGID = [sys.executable, "-m", "flows.cli"]


def test_tracker_counts_each_input_once_whatever_events_arrive():
    tracker = Tracker()
    tracker("skipped", {"shard": 0, "inputs": 4, "rejected": 1})
    assert tracker("batch", {"shard": 1, "inputs": 2, "rejected": 0}) == 2
    assert tracker("batch", {"shard": 1, "inputs": 2, "rejected": 1}) == 2
    # The shard's own result after its batches adds nothing twice...
    assert tracker("shard", {"shard": 1, "inputs": 4, "rejected": 1}) == 0
    # ...and a shard reported only as a whole (a Dask worker's batches never reach us) counts.
    assert tracker("shard", {"shard": 2, "inputs": 3, "rejected": 2}) == 3
    assert (tracker.inputs, tracker.rejected, tracker.skipped, tracker.shards_done) == (11, 4, 4, 3)


def status(out: Path) -> dict:
    done = subprocess.run([*FGID, "status", str(out), "--json"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_status_of_a_running_a_killed_and_a_resumed_build(demo_inputs, tmp_path):
    inputs = tmp_path / "in"
    for copy in range(3):  # 30 inputs, 8 shards: long enough to catch it running
        (inputs / str(copy)).mkdir(parents=True)
        for photo in demo_inputs.iterdir():
            (inputs / str(copy) / photo.name).write_bytes(photo.read_bytes())
    out = tmp_path / "out"
    args = [*FGID, "build", str(inputs), "--out", str(out), "--models", "lite",
            "--shard-size", "4", "--batch-size", "2", "--no-prefect"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (out / "plan.parquet").exists() and len(list(out.glob("shards/*.stats.json"))) >= 2:
                break
            time.sleep(0.2)
        running = status(out)
        assert running["state"] == "running" and running["holder"]["pid"] == proc.pid
        assert running["shards_planned"] == 8 and running["inputs_planned"] == 30
        assert 2 <= running["shards_done"] < 8 and running["inputs_done"] >= 8
        assert running["inputs_per_second"] > 0 and running["eta_seconds"] is not None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = status(out)
    assert killed["state"] == "interrupted" and killed["holder"] is None
    assert killed["shards_done"] < 8
    shown = subprocess.run([*FGID, "status", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert "interrupted" in shown.stderr and "rerun the same fgid build command" in shown.stderr

    resumed = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finished = status(out)
    assert finished["state"] == "finished"
    assert (finished["shards_done"], finished["inputs_done"]) == (8, 30)


def run_in_terminal(args: list[str], timeout: float = 300) -> str:
    """Run a command on a pseudo-terminal, as a user's shell would, and return what it drew."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen(args, cwd=ROOT, stdin=follower, stdout=follower, stderr=follower,
                            env=env, close_fds=True)  # fmt: skip
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the command exited and closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=30)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_the_progress_bar_moves_per_batch_with_rate_and_eta(demo_inputs, tmp_path):
    drawn = run_in_terminal([*FGID, "build", str(demo_inputs), "--out", str(tmp_path / "o"),
                             "--models", "lite", "--shard-size", "10", "--batch-size", "2",
                             "--no-prefect"])  # fmt: skip
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    counts = {int(m) for m in re.findall(r"(\d+)/10 inputs", plain)}
    # One shard of 10 inputs: a bar that moved only per shard would jump from 0 to 10.
    assert 10 in counts and len(counts - {0, 10}) >= 1, sorted(counts)
    assert re.search(r"\d+\.\d inputs/s", plain) and "eta" in plain
    # Log lines print above the bar, on lines of their own, never written into it.
    drawn_lines = re.split(r"[\r\n]+", plain)
    logged = [line for line in drawn_lines if "shard 00000:" in line]
    assert logged and not any("inputs/s" in line or "━" in line for line in logged), logged
