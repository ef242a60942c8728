"""Downloads against a real HTTP server on 127.0.0.1: each failure is a specific reason."""

from __future__ import annotations

import time
from email.message import Message
from urllib.parse import quote

import pytest
from http_server import serving

from fgid import download
from fgid.config import DownloadConfig
from fgid.download import fetch, fetch_all, opt_out_directive, user_agent
from fgid.schema import REASONS
from fgid.sources import Unusable
from tests.corpus import jpeg_bytes
from tests.photos import astronaut

# The test server is on 127.0.0.1, which a build refuses unless it is allowed.
LOCAL = {"private_addresses": True}
FAST = DownloadConfig(timeout=0.5, retries=1, backoff=0.01, **LOCAL)
CAP = 1 << 20


@pytest.fixture(scope="module")
def photo():
    return jpeg_bytes(astronaut())


@pytest.fixture()
def server(photo):
    with serving({"a.jpg": photo}, slow_seconds=3.0) as running:
        yield running


def failure(url: str, settings: DownloadConfig = FAST, cap: int = CAP) -> tuple[str, str]:
    with pytest.raises(Unusable) as caught:
        fetch(url, settings, cap)
    assert caught.value.code in REASONS
    return caught.value.code, caught.value.detail


def test_photos_come_back_byte_for_byte_with_our_user_agent(server, photo):
    for path in ("photos/a.jpg", "octet/a.jpg", "untyped/a.jpg", "redirect/a.jpg"):
        assert fetch(server.url(path), FAST, CAP) == photo
    assert set(server.agents) == {user_agent(FAST)}
    assert user_agent(FAST).startswith("fgid/") and "(+http" in user_agent(FAST)
    custom = DownloadConfig(user_agent="my-crawler/1.0 (+https://example.com)", **LOCAL)
    fetch(server.url("photos/a.jpg"), custom, CAP)
    assert server.agents[-1] == "my-crawler/1.0 (+https://example.com)"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("nothing-here.jpg", "http_404"),
        ("status/403", "http_403"),
        ("status/418", "http_error"),
        ("html/a.jpg", "not_an_image"),
        ("redirect-file/a.jpg", "bad_url"),
        ("redirect-credentials/a.jpg", "bad_url"),
        ("redirect-loop/a.jpg", "bad_url"),
        ("declared-huge/a.jpg", "file_too_large"),
        ("huge/a.jpg", "file_too_large"),
        ("reset/a.jpg", "connection_error"),
    ],
)
def test_each_failure_has_its_reason(server, path, code):
    assert failure(server.url(path))[0] == code


def test_a_redirect_never_repeats_credentials(server):
    _, detail = failure(server.url("redirect-credentials/a.jpg"))
    assert "secret" not in detail


def test_slow_answers_and_slow_bodies_time_out_within_bounds(server):
    for path in ("slow/a.jpg", "drip/a.jpg"):
        started = time.monotonic()
        assert failure(server.url(path))[0] == "timeout"
        # Two attempts of 0.5 s, each overrunning by at most one more timeout, and a backoff.
        assert time.monotonic() - started < 3.0
    assert server.hits["/slow/a.jpg"] == 2  # retried once


def test_retries_only_what_can_pass_on_a_second_try(server, photo):
    retrying = DownloadConfig(timeout=2, retries=2, backoff=0.01, **LOCAL)
    assert fetch(server.url("flaky/a.jpg"), retrying, CAP) == photo
    assert server.hits["/flaky/a.jpg"] == 3  # two 503s, then the photo
    assert failure(server.url("status/503"), retrying)[0] == "http_503"
    assert server.hits["/status/503"] == 3
    assert failure(server.url("status/429"), retrying)[0] == "http_429"
    assert failure(server.url("status/404"), retrying)[0] == "http_404"
    assert server.hits["/status/404"] == 1  # a 404 is final


@pytest.mark.parametrize(
    ("header", "refused"),
    [
        ("noai", True),
        ("noimageai", True),
        ("noindex, nofollow", True),
        ("NoImageIndex", True),
        ("none", True),
        ("fgid: noai", True),
        ("otherbot: noai, noindex", False),
        ("nofollow", False),
        ("unavailable_after: 25 Jun 2010 15:00:00 PST", False),
    ],
)
def test_opt_out_headers_are_honoured_by_default(server, photo, header, refused):
    url = server.url(f"optout/{quote(header, safe='')}/a.jpg")
    if refused:
        code, detail = failure(url)
        assert code == "opted_out" and "X-Robots-Tag" in detail
        # The setting turns it off.
        assert fetch(url, FAST.model_copy(update={"honour_opt_out": False}), CAP) == photo
    else:
        assert fetch(url, FAST, CAP) == photo


def test_opt_out_parsing_reads_every_header_value():
    headers = Message()
    headers["X-Robots-Tag"] = "otherbot: noai"
    assert opt_out_directive(headers) is None
    headers["X-Robots-Tag"] = "noimageai"
    assert opt_out_directive(headers) == "noimageai"


def test_urls_that_are_not_http_or_carry_credentials_are_refused_unrequested(server):
    assert failure("file:///etc/hostname")[0] == "bad_url"
    code, detail = failure(f"http://user:hunter2@127.0.0.1:{server.server_address[1]}/photos/a.jpg")
    assert code == "bad_url" and "hunter2" not in detail
    code, detail = failure(f"http://user:hunter2@[::1]:{server.server_address[1]}/photos/a.jpg")
    assert code == "bad_url" and "credentials" in detail and "hunter2" not in detail
    assert not server.hits


def test_non_public_addresses_are_refused_by_default_without_a_request(server, photo):
    port = server.server_address[1]
    strict = FAST.model_copy(update={"private_addresses": False})
    assert DownloadConfig().private_addresses is False
    for url in (
        server.url("photos/a.jpg"),  # 127.0.0.1
        f"http://localhost:{port}/photos/a.jpg",
        "http://169.254.169.254/latest/meta-data/",  # a cloud metadata service
        "http://10.0.0.1/a.jpg",
        "http://0.0.0.0/a.jpg",
        f"http://[::1]:{port}/photos/a.jpg",  # IPv6 literals are URLs like any other
        "http://[fd00::1]/a.jpg",
    ):
        code, detail = failure(url, strict)
        assert code == "blocked_address" and "not a public address" in detail, url
    assert not server.hits
    # What a name may resolve to in IPv6.
    for address in ("::1", "::ffff:127.0.0.1", "fe80::1%eth0", "fd00::1", "ff02::1"):
        with pytest.raises(Unusable, match="not a public address"):
            download._public("example.org", address)
    download._public("example.org", "2606:4700::1111")  # public: no exception
    download._public("example.org", "1.1.1.1")
    # A public address that redirects here would be refused at the redirect's connection; the
    # same check runs on every connection, so the local redirect shows it.
    assert failure(server.url("redirect/a.jpg"), strict)[0] == "blocked_address"
    assert fetch(server.url("photos/a.jpg"), FAST, CAP) == photo


def test_fetch_all_runs_side_by_side(server, photo):
    many = DownloadConfig(timeout=5, retries=0, concurrency=8, **LOCAL)
    urls = [server.url(f"slow/{i}.jpg") for i in range(8)]
    server.slow_seconds = 0.5
    started = time.monotonic()
    results = fetch_all(urls, many, CAP)
    assert time.monotonic() - started < 2.5  # 8 x 0.5 s one after another would be 4 s
    assert list(results) == urls
    assert all(isinstance(r, Unusable) and r.code == "empty_file" for r in results.values())
