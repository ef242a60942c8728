"""A real HTTP server on 127.0.0.1 for download tests: photos, errors, redirects, slow and huge
bodies, and opt-out headers. Every handler's loop is bounded; the server stops when the test
leaves `serving`, cutting short any handler still sleeping."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HUGE_CHUNK = 64 * 1024
HUGE_CHUNKS = 256  # 16 MiB at most, whoever asks


class PhotoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, photos: dict[str, bytes], slow_seconds: float = 3.0) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.photos, self.slow_seconds = photos, slow_seconds
        self.hits: Counter[str] = Counter()
        self.agents: list[str] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.flaky_failures = 2  # /flaky/* answers 503 this many times per path, then the photo

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (timeouts, size caps) is what these tests are about

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"


class Handler(BaseHTTPRequestHandler):
    server: PhotoServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet test output
        pass

    def _send(self, status: int, body: bytes = b"", kind: str = "image/jpeg", **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _photo(self, name: str) -> bytes | None:
        return self.server.photos.get(name)

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        server = self.server
        with server.lock:
            server.hits[self.path] += 1
            server.agents.append(self.headers.get("User-Agent", ""))
            hits = server.hits[self.path]
        parts = self.path.strip("/").split("/")
        kind, name = parts[0], parts[-1]
        photo = self._photo(name)
        if kind == "photos" and photo is not None:
            return self._send(200, photo)
        if kind == "octet" and photo is not None:
            return self._send(200, photo, "application/octet-stream")
        if kind == "untyped" and photo is not None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(photo)))
            self.end_headers()
            self.wfile.write(photo)
            return None
        if kind == "redirect":
            return self._send(302, b"", "text/plain", Location=f"/photos/{name}")
        if kind == "redirect-file":
            return self._send(302, b"", "text/plain", Location="file:///etc/hostname")
        if kind == "redirect-credentials":
            target = f"http://user:secret@127.0.0.1:{server.server_address[1]}/photos/{name}"
            return self._send(302, b"", "text/plain", Location=target)
        if kind == "redirect-loop":
            return self._send(302, b"", "text/plain", Location=self.path)
        if kind == "optout":  # /optout/<directive header value, url-escaped>/<photo>
            from urllib.parse import unquote

            value = unquote(parts[1])
            return self._send(200, self._photo(name) or b"", X_Robots_Tag=value)
        if kind == "html":
            return self._send(200, b"<html><body>a page, not a photo</body></html>", "text/html")
        if kind == "slow":  # answers only after slow_seconds (or when the server stops)
            server.stopping.wait(server.slow_seconds)
            return self._send(200, photo or b"")
        if kind == "drip":  # headers at once, then one byte per 0.2 s for at most 200 bytes
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "200")
            self.end_headers()
            for _ in range(200):
                if server.stopping.wait(0.2):
                    return None
                self.wfile.write(b"x")
                self.wfile.flush()
            return None
        if kind == "huge":  # no Content-Length, up to HUGE_CHUNKS chunks, stops when cut
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(HUGE_CHUNKS):
                    if server.stopping.is_set():
                        break
                    self.wfile.write(b"\xff" * HUGE_CHUNK)
            self.close_connection = True
            return None
        if kind == "declared-huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10**12))
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return None
        if kind == "flaky" and hits <= server.flaky_failures:
            return self._send(503, b"busy", "text/plain")
        if kind == "flaky" and photo is not None:
            return self._send(200, photo)
        if kind == "status":  # /status/<code>
            code = int(parts[1])
            return self._send(code, b"no", "text/plain", Retry_After="0")
        if kind == "reset":
            self.close_connection = True
            self.connection.close()
            return None
        return self._send(404, b"not found", "text/plain")


@contextlib.contextmanager
def serving(photos: dict[str, bytes], slow_seconds: float = 3.0) -> Iterator[PhotoServer]:
    server = PhotoServer(photos, slow_seconds)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        time.sleep(0)  # let handler threads see `stopping`
