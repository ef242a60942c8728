"""One writer per output: a live holder refuses others at once, a dead one never blocks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import storage
from fgid.dataset import Dataset, DatasetInUse
from storage.lock import LOCK_NAME, OutputHeld, OutputLock

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; from storage.lock import OutputLock\n"
    "with OutputLock(sys.argv[1], 'fgid build'):\n"
    "    print('held', flush=True); time.sleep(120)\n"
)


def hold_in_child(folder) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_holder_refuses_at_once_and_a_killed_one_does_not_block(tmp_path):
    out = tmp_path / "ds"
    child = hold_in_child(out)
    try:
        started = time.monotonic()
        with pytest.raises(DatasetInUse) as error, Dataset(str(out)).lock("fgid remove"):
            pass
        assert time.monotonic() - started < 2
        message = str(error.value)
        assert f"pid {child.pid} on {socket.gethostname()} (fgid build)" in message
        assert "\n" not in message
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with Dataset(str(out)).lock("fgid remove"):  # the dead holder's lock is taken over
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["command"] == "fgid remove"
    assert not (out / LOCK_NAME).exists()


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    owner = {"pid": 1, "host": "elsewhere", "command": "fgid caption", "heartbeat": time.time()}
    (out / LOCK_NAME).write_text(json.dumps(owner))
    with pytest.raises(OutputHeld, match="pid 1 on elsewhere"), OutputLock(str(out), "x"):
        pass
    (out / LOCK_NAME).write_text(json.dumps({**owner, "heartbeat": time.time() - 3600}))
    with OutputLock(str(out), "x"):
        pass


def test_heartbeat_keeps_a_long_holder_fresh(tmp_path):
    with OutputLock(str(tmp_path), "x", heartbeat=0.05) as lock:
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
        assert lock.token == json.loads((tmp_path / LOCK_NAME).read_text())["token"]


def test_a_second_build_is_refused_while_one_runs(tmp_path, demo_inputs, lite_config):
    from fgid.pipeline import build, prepare_output

    out = tmp_path / "ds"
    child = hold_in_child(out)
    try:
        with pytest.raises(DatasetInUse, match=f"pid {child.pid}"):
            build([str(demo_inputs)], str(out), lite_config)
        with pytest.raises(DatasetInUse):
            prepare_output([str(demo_inputs)], str(out), lite_config)
    finally:
        child.kill()
        child.wait()


def test_stale_tmp_cleanup_spares_live_writers(tmp_path):
    child = hold_in_child(tmp_path / "other")
    host = socket.gethostname()
    try:
        live = tmp_path / f".00000.tar.tmp-{host}-{child.pid}"
        dead = tmp_path / f".00001.tar.tmp-{host}-{2**22 + 12345}"
        foreign = tmp_path / ".00002.tar.tmp-elsewhere-1"
        for path in (live, dead, foreign):
            path.write_bytes(b"partial")
        assert storage.remove_stale_tmp(tmp_path) == 1
        assert live.exists() and foreign.exists() and not dead.exists()
        os.utime(foreign, (time.time() - 2 * 86400,) * 2)
        assert storage.remove_stale_tmp(tmp_path) == 1 and not foreign.exists()
    finally:
        child.kill()
        child.wait()
