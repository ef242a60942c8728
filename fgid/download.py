"""Fetch http(s) sources: timeouts, bounded retries with backoff, a size cap, opt-out headers.

Every failure becomes `Unusable` with a reason of fgid.schema.REASONS (`http_404`, `timeout`,
`file_too_large`, `not_an_image`, `opted_out`, ...), never an exception that fails a shard.
Only timeouts, connection errors, 429 and 5xx are retried. Bodies are streamed and stopped at
the cap, and a whole request (connection, headers, body) must finish within `timeout` (a stalled
read may overrun it by one more `timeout`). Redirects may lead only to http(s) URLs without
credentials, at most MAX_REDIRECTS times. Bodies are never decompressed (no Accept-Encoding).

A URL table is often someone else's file, so by default a connection goes only to public
addresses: a host that resolves to a loopback, private, link-local (cloud metadata services),
shared or reserved address is refused (`blocked_address`), redirects included, and the socket
connects to the address that was checked, so a second lookup cannot swap it (DNS rebinding).
`download.private_addresses` lifts this for a server on the user's own network (or a proxy).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from email.message import Message

from fgid import version
from fgid.config import DownloadConfig
from fgid.schema import REASONS
from fgid.sources import Unusable, is_web
from storage.credentials import check_url

PROJECT_URL = "https://example.com/fgid"  # the project's public address, once it has one
UA_TOKEN = "fgid"  # the name an `X-Robots-Tag: fgid: noai` directive addresses
# img2dataset's default set, and `none` (which implies noindex).
OPT_OUT = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})
MAX_REDIRECTS = 5
MAX_BACKOFF = 30.0
CHUNK = 64 * 1024
# Not images, whatever the decoder could make of them; a missing type is left to the decoder.
GENERIC_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})


def user_agent(settings: DownloadConfig) -> str:
    return settings.user_agent or f"fgid/{version()} (+{PROJECT_URL})"


def opt_out_directive(headers: Message, token: str = UA_TOKEN) -> str | None:
    """The X-Robots-Tag directive refusing this use, if any.

    A header value addresses every robot (`noai, noindex`) or one (`fgid: noai`); as
    img2dataset, one naming another robot is ignored. Directives compare case-insensitively."""
    for value in headers.get_all("X-Robots-Tag") or []:
        head, colon, tail = str(value).partition(":")
        robot = head.strip().lower() if colon and "," not in head else ""
        if robot in OPT_OUT or robot.startswith("unavailable_after"):
            robot, tail = "", str(value)  # a directive with a value, not a robot's name
        if robot not in ("", token):
            continue
        for part in (tail if robot else str(value)).split(","):
            directive = part.split(":", 1)[0].strip().lower()
            if directive in OPT_OUT:
                return directive
    return None


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_web(newurl):
            raise Unusable("bad_url", f"redirect to a non-http(s) URL ({code})")
        try:
            check_url(newurl)
        except ValueError:
            raise Unusable("bad_url", f"redirect to a URL with credentials ({code})") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _public(host: str, address: str) -> None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is not an address
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast:
        raise Unusable("blocked_address", f"{host} is at {ip}, not a public address")


def _public_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """socket.create_connection, to public addresses only: every address the name resolves to
    is checked first (one non-public answer refuses the host), then one of those is connected."""
    host, port = address
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in found:
        _public(host, sockaddr[0])
    error: OSError = OSError(f"{host}: no address")
    for family, kind, proto, _, sockaddr in found:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as failed:
            sock.close()
            error = failed
    raise error


class _PublicHTTP(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _public_connection  # what connect() opens its socket with


class _PublicHTTPS(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _public_connection


class _PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_PublicHTTP, req)


class _PublicHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_PublicHTTPS, req, context=self._context)


_OPENER = urllib.request.build_opener(_CheckedRedirects)
_PUBLIC_OPENER = urllib.request.build_opener(
    _CheckedRedirects, _PublicHTTPHandler, _PublicHTTPSHandler
)


class _Retry(Exception):
    def __init__(self, failure: Unusable, wait: float | None = None) -> None:
        super().__init__(failure.detail)
        self.failure, self.wait = failure, wait


def _status_failure(code: int, reason: str) -> Unusable:
    name = f"http_{code}"
    if name in REASONS:
        return Unusable(name, reason)
    if 300 <= code < 400:
        return Unusable("bad_url", f"redirect {code} {reason} (a loop, or more than "
                                   f"{MAX_REDIRECTS})")  # fmt: skip
    return Unusable("http_error", f"{code} {reason}")


def _retry_after(headers: Message | None) -> float | None:
    value = (headers or Message()).get("Retry-After", "")
    return float(value) if value.strip().isdigit() else None


def _once(url: str, settings: DownloadConfig, max_bytes: int) -> bytes:
    deadline = time.monotonic() + settings.timeout
    request = urllib.request.Request(url, headers={"User-Agent": user_agent(settings),
                                                   "Accept": "image/*,*/*;q=0.5"})  # fmt: skip
    try:
        opener = _OPENER if settings.private_addresses else _PUBLIC_OPENER
        with opener.open(request, timeout=settings.timeout) as response:
            return _body(response, settings, max_bytes, deadline)
    except urllib.error.HTTPError as error:
        with error:
            failure = _status_failure(error.code, str(error.reason))
            if error.code == 429 or error.code >= 500:
                raise _Retry(failure, _retry_after(error.headers)) from None
            raise failure from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise _Retry(Unusable("timeout", f"after {settings.timeout}s")) from None
        if isinstance(error.reason, ssl.SSLCertVerificationError):
            raise Unusable("connection_error", f"TLS: {error.reason}") from None
        raise _Retry(Unusable("connection_error", str(error.reason)[:200])) from None
    except TimeoutError:
        raise _Retry(Unusable("timeout", f"after {settings.timeout}s")) from None
    except (http.client.HTTPException, ConnectionError, ssl.SSLError, OSError) as error:
        detail = f"{type(error).__name__}: {str(error)[:200]}"
        raise _Retry(Unusable("connection_error", detail)) from None


def _body(response, settings: DownloadConfig, max_bytes: int, deadline: float) -> bytes:
    headers = response.headers
    if settings.honour_opt_out:
        directive = opt_out_directive(headers)
        if directive:
            raise Unusable("opted_out", f"X-Robots-Tag: {directive}")
    kind = headers.get_content_type() if headers.get("Content-Type") else None
    if kind and not kind.startswith("image/") and kind not in GENERIC_TYPES:
        raise Unusable("not_an_image", f"content type {kind}")
    length = headers.get("Content-Length", "")
    if length.strip().isdigit() and int(length) > max_bytes:
        raise Unusable("file_too_large", f"Content-Length {int(length)} > {max_bytes}")
    parts, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise _Retry(Unusable("timeout", f"body not complete after {settings.timeout}s"))
        # read1: whatever one receive gives, so a trickling body meets the deadline check.
        chunk = response.read1(min(CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise Unusable("file_too_large", f"more than {max_bytes} bytes")
    if not total:
        raise Unusable("empty_file")
    return b"".join(parts)


def fetch(url: str, settings: DownloadConfig, max_bytes: int) -> bytes:
    """The body of `url`, or Unusable with the reason of the last attempt."""
    if not is_web(url):
        raise Unusable("bad_url", "not an http(s) URL")
    try:
        check_url(url)
    except ValueError as error:
        raise Unusable("bad_url", str(error)) from None
    for attempt in range(settings.retries + 1):
        try:
            return _once(url, settings, max_bytes)
        except _Retry as retry:
            if attempt == settings.retries:
                raise retry.failure from None
            wait = settings.backoff * 2**attempt
            time.sleep(min(MAX_BACKOFF, max(wait, retry.wait or 0.0)))
    raise AssertionError("unreachable")


def fetch_all(
    urls: Iterable[str], settings: DownloadConfig, max_bytes: int
) -> dict[str, bytes | Unusable]:
    """Each URL's body or failure, fetched `settings.concurrency` at a time."""
    todo = list(dict.fromkeys(urls))
    if not todo:
        return {}

    def one(url: str) -> bytes | Unusable:
        try:
            return fetch(url, settings, max_bytes)
        except Unusable as failure:
            return failure

    workers = min(settings.concurrency, len(todo))
    with ThreadPoolExecutor(workers, thread_name_prefix="fgid-download") as pool:
        return dict(zip(todo, pool.map(one, todo), strict=True))
