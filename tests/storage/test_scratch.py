"""Scratch folders: a SIGKILLed run's folder is removed by the next run; nothing else is."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from storage.scratch import scratch

ROOT = Path(__file__).resolve().parents[2]

KILLED = """
import os, signal, sys, tempfile
tempfile.tempdir = sys.argv[1]
from storage.scratch import scratch
with scratch("finalize") as folder:
    open(os.path.join(folder, "embeddings.f32"), "wb").write(b"x" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture()
def tmp_root(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_killed_runs_scratch_is_removed_by_the_next_run(tmp_root):
    killed = subprocess.run([sys.executable, "-c", KILLED, str(tmp_root)], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    here = socket.gethostname()
    (left,) = tmp_root.iterdir()
    assert left.name.startswith(f"fgid-finalize-{here}-") and (left / "embeddings.f32").exists()
    live = tmp_root / f"fgid-finalize-{here}-{os.getpid()}-live"  # this process: alive
    other_host = tmp_root / "fgid-finalize-elsewhere-1-x"  # another host's pids are not ours
    other_kind = tmp_root / f"fgid-sort-{here}-999999999-y"
    for folder in (live, other_host, other_kind):
        folder.mkdir()
    with scratch("finalize") as folder:
        assert os.path.isdir(folder)
        assert not left.exists()
        assert live.exists() and other_host.exists() and other_kind.exists()
    assert not os.path.exists(folder)
    assert sorted(p.name for p in tmp_root.iterdir()) == sorted(
        p.name for p in (live, other_host, other_kind)
    )
