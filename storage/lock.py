"""Exclusive ownership of an output folder: one writing process at a time, named when refused.

The lock is a small JSON object `LOCK_NAME` in the folder: holder pid, host, command, a random
token and a heartbeat that a thread refreshes every `heartbeat` seconds while the lock is held.
A lock is stale, and taken over, when its holder is on this host and its pid is gone (a killed
process), or when its heartbeat is older than `stale_after` (a holder on another host that died,
or a reused pid). A live holder's lock is never taken: the second process gets `OutputHeld`
at once, with a one-line message naming the holder.

Local folders: the lock file is created with O_EXCL, so exactly one of two racing processes
gets it; a stale one is first renamed away (one taker wins the rename). Object stores (s3://)
have no create-if-absent that every server honours, so the lock object is written, then read
back after `SETTLE_SECONDS`: of two processes that raced, both read the later write and only its
writer proceeds. This holds as long as a writer's check and write lie closer together than the
settle delay, which they do by far (one request each); the heartbeat keeps a live holder's
object fresh, and a holder that finds another token in its object stops heartbeating it.
Re-entering the lock in the process that holds it is allowed (a build that refinalizes).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import UTC, datetime

from storage.atomic import atomic_write_text, pid_alive
from storage.files import exists, is_remote, join, read_text, remove

LOCK_NAME = ".fgid-lock.json"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten missed heartbeats
SETTLE_SECONDS = 1.0

_held: dict[str, tuple[OutputLock, int]] = {}  # lock url -> (holder, depth) in this process
_held_guard = threading.Lock()


class OutputHeld(RuntimeError):
    """Another live process holds the folder."""


def describe(owner: dict) -> str:
    return (
        f"pid {owner.get('pid')} on {owner.get('host')} ({owner.get('command')}), "
        f"since {owner.get('started')}"
    )


def read_owner(folder: str) -> dict | None:
    """The recorded holder of `folder`, or None when nobody holds it."""
    url = join(str(folder), LOCK_NAME)
    try:
        return json.loads(read_text(url))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {"torn": True}


def is_stale(owner: dict, stale_after: float = STALE_SECONDS, now: float | None = None) -> bool:
    if owner.get("torn"):
        return True  # a holder killed between create and write; a live one writes at once
    now = time.time() if now is None else now
    if now - float(owner.get("heartbeat", 0)) > stale_after:
        return True
    return owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", 0)))


class OutputLock:
    """`with OutputLock(folder, "fgid build"):` holds `folder` for the block."""

    def __init__(
        self,
        folder: str,
        command: str,
        *,
        heartbeat: float = HEARTBEAT_SECONDS,
        stale_after: float = STALE_SECONDS,
        error: type[OutputHeld] = OutputHeld,
    ) -> None:
        self.folder, self.command = str(folder), command
        self.url = join(self.folder, LOCK_NAME)
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.token, self.error = uuid.uuid4().hex, error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _owner(self) -> dict:
        now = time.time()
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "argv": " ".join(sys.argv)[:300],
            "token": self.token,
            "started": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "heartbeat": now,
        }

    def __enter__(self) -> OutputLock:
        with _held_guard:
            held = _held.get(self.url)
            if held is not None:
                _held[self.url] = (held[0], held[1] + 1)
                return held[0]
            self._acquire()
            _held[self.url] = (self, 1)
        self._thread = threading.Thread(target=self._beat, name="fgid-lock", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with _held_guard:
            holder, depth = _held[self.url]
            if depth > 1:
                _held[self.url] = (holder, depth - 1)
                return
            del _held[self.url]
        holder._release()

    def _refuse(self, owner: dict) -> OutputHeld:
        return self.error(f"{self.folder} is in use by {describe(owner)}; wait for it or stop it")

    def _acquire(self) -> None:
        if is_remote(self.url):
            self._acquire_remote()
            return
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.url, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_owner(self.folder)
                if owner is None:
                    continue  # released meanwhile
                if not is_stale(owner, self.stale_after):
                    raise self._refuse(owner) from None
                # Renamed away first: of two processes taking over, one wins the rename.
                aside = f"{self.url}.stale-{self.token}"
                try:
                    os.rename(self.url, aside)
                except FileNotFoundError:
                    continue
                os.unlink(aside)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self._owner(), handle)
            return
        raise self.error(f"{self.folder}: could not take its lock (contended)")

    def _acquire_remote(self) -> None:
        self._check_remote()
        atomic_write_text(self.url, json.dumps(self._owner()))
        time.sleep(SETTLE_SECONDS)
        self._verify_remote()

    def _check_remote(self) -> None:
        owner = read_owner(self.folder)
        if owner is not None and not is_stale(owner, self.stale_after):
            raise self._refuse(owner)

    def _verify_remote(self) -> None:
        """After the settle delay: the object must still be ours, or another writer won."""
        owner = read_owner(self.folder)
        if owner is None or owner.get("token") != self.token:
            raise self._refuse(owner or {})

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            owner = read_owner(self.folder)
            if owner is None or owner.get("token") != self.token:
                return  # taken over (we were stale): never write over the new holder
            owner["heartbeat"] = time.time()
            atomic_write_text(self.url, json.dumps(owner))

    def _release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        owner = read_owner(self.folder)
        if owner is not None and owner.get("token") == self.token and exists(self.url):
            remove(self.url)


def holder(folder: str) -> dict | None:
    """The live holder of `folder` other than this process, or None."""
    owner = read_owner(folder)
    if owner is None or is_stale(owner):
        return None
    if owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
        return None
    return owner
