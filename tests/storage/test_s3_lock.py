"""The output lock on a real S3 server: written, read back after a settle delay, heartbeated."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from s3_server import BUCKET

import storage
from storage.lock import LOCK_NAME, OutputHeld, OutputLock


@pytest.fixture()
def prefix(s3_env):
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def lock_object(prefix: str) -> dict:
    return json.loads(storage.read_text(storage.join(prefix, LOCK_NAME)))


def test_a_live_holder_is_refused_and_its_object_goes_with_it(prefix):
    with OutputLock(prefix, "fgid build") as held:
        assert lock_object(prefix)["token"] == held.token
        with pytest.raises(OutputHeld, match=rf"pid {os.getpid()} on .* \(fgid build\)"):
            OutputLock(prefix, "fgid caption")._acquire()
    assert not storage.exists(storage.join(prefix, LOCK_NAME))


def test_a_lock_without_heartbeat_is_taken_over(prefix):
    stale = {"pid": 1, "host": "elsewhere", "command": "x", "heartbeat": time.time() - 3600}
    storage.atomic_write_text(storage.join(prefix, LOCK_NAME), json.dumps(stale))
    with OutputLock(prefix, "fgid remove") as taken:
        assert lock_object(prefix)["token"] == taken.token


def test_of_two_racing_writers_only_the_later_proceeds(prefix):
    first, second = OutputLock(prefix, "a"), OutputLock(prefix, "b")
    first._check_remote()  # both find the folder free ...
    second._check_remote()
    for lock in (first, second):  # ... and both write their claim
        storage.atomic_write_text(storage.join(prefix, LOCK_NAME), json.dumps(lock._owner()))
    time.sleep(0.1)
    second._verify_remote()
    with pytest.raises(OutputHeld, match=r"\(b\)"):
        first._verify_remote()
