"""The local Prefect server fgid starts when no PREFECT_API_URL is set, kept for later runs.

Prefect's own temporary server starts with every command and must answer within 20 s; on a busy
2-core machine, and on every newcomer's first run (creating and migrating its database), it did
not. So fgid starts `prefect server start` once per Prefect home, in the background, waits for
its health endpoint as long as a slow machine needs, records where it listens in
`$PREFECT_HOME/fgid-server.json`, and reuses it: a later build connects in milliseconds, and the
runs stay visible in its UI. `fgid server stop` stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fgid.errors import FailureError

STATE_FILE = "fgid-server.json"
LOG_FILE = "fgid-server.log"
LOCK_FILE = "fgid-server.lock"
# A first start creates and migrates the database; under load that took over a minute.
DEFAULT_START_TIMEOUT = 600.0
START_TIMEOUT_ENV = "FGID_PREFECT_START_TIMEOUT"
HINT = "run with --no-prefect, or set PREFECT_API_URL to a running Prefect server"


class ServerError(FailureError):
    """The local server could not be started or reached; the message says what to do."""


@dataclass(frozen=True)
class LocalServer:
    pid: int
    port: int
    home: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / LOG_FILE


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile, if any."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds the pid
        return True
    return True


def read_state(home: Path) -> LocalServer | None:
    try:
        state = json.loads((home / STATE_FILE).read_text())
        return LocalServer(pid=int(state["pid"]), port=int(state["port"]), home=home)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_server(home: Path) -> LocalServer | None:
    """The recorded server if its process lives and it answers, else None."""
    server = read_state(home)
    if server and _alive(server.pid) and healthy(server.api_url):
        return server
    return None


@contextlib.contextmanager
def _start_lock(home: Path) -> Iterator[None]:
    # Two builds started together must not start two servers on one database.
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_timeout() -> float:
    value = os.environ.get(START_TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_START_TIMEOUT
    except ValueError:
        raise ServerError(f"{START_TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def ensure_server(
    home: Path | None = None,
    timeout: float | None = None,
    say: Callable[[str], None] = lambda _line: None,
) -> LocalServer:
    """The running local server for `home`, started (and waited for) if there is none."""
    home = Path(home) if home else prefect_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ServerError(
            f"cannot use the Prefect home {home} ({error.strerror}); {HINT}"
        ) from None
    with _start_lock(home):
        server = running_server(home)
        if server:
            return server
        stop_server(home)  # a recorded server that no longer answers: clear it out first
        say(
            "Starting a local Prefect server for fgid runs (the first start sets up its "
            "database and can take a minute) ..."
        )
        return _start(home, timeout if timeout is not None else start_timeout())


def _start(home: Path, timeout: float) -> LocalServer:
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    command = [sys.executable, "-m", "prefect", "server", "start"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with open(home / LOG_FILE, "ab") as log:
        # Its own session: Ctrl-C on this build does not stop the server later runs reuse.
        proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LocalServer(pid=proc.pid, port=port, home=home)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"the local Prefect server exited with code {proc.returncode} "
                f"(log: {server.log}); {HINT}"
            )
        if healthy(server.api_url):
            (home / STATE_FILE).write_text(json.dumps({"pid": proc.pid, "port": port}))
            return server
        time.sleep(0.5)
    _terminate(proc.pid)
    raise ServerError(
        f"the local Prefect server did not answer within {timeout:.0f} s (log: {server.log}); "
        f"{HINT}, or allow it longer with {START_TIMEOUT_ENV}=SECONDS"
    )


def _terminate(pid: int, grace: float = 20.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            # Reap it if it is our child; otherwise only ask whether it still exists.
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            if not _alive(pid):
                return
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop_server(home: Path | None = None) -> LocalServer | None:
    """Stop the recorded local server of `home` (if any) and forget it; returns what it stopped."""
    home = Path(home) if home else prefect_home()
    server = read_state(home)
    if server is None:
        return None
    if _alive(server.pid) and _is_our_server(server.pid):
        _terminate(server.pid)
    with contextlib.suppress(FileNotFoundError):
        (home / STATE_FILE).unlink()
    return server


def _is_our_server(pid: int) -> bool:
    # The pid may have been reused since the state was written: only signal a Prefect server.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the state file
    return b"prefect" in cmdline and b"server" in cmdline


@contextlib.contextmanager
def prefect_api(say: Callable[[str], None] = lambda _line: None) -> Iterator[str]:
    """Point Prefect at PREFECT_API_URL if one is configured, else at the local fgid server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = configured_api_url()
    if url:
        if not healthy(url, timeout=10):
            raise ServerError(
                f"the Prefect server at PREFECT_API_URL={url} does not answer; "
                "start it, unset PREFECT_API_URL, or run with --no-prefect"
            )
        yield url
        return
    server = ensure_server(say=say)
    say(f"Prefect UI: {server.ui_url} (kept running for later runs; `fgid server stop` stops it)")
    # The environment too: Dask workers and other child processes read it when they start.
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
