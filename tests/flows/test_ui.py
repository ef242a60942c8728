"""Headless Chromium sees a build in the Prefect UI: its run, shard task runs, tags, artifacts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("FGID_CHROMIUM", "/usr/bin/chromium")
# Flags that rendered the Prefect UI reliably in containers; nothing reaches the network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DATASET = "ui-demo"
STAGES = "decode>detect>align>parse>embed>attributes>caption"
SHARD_RUNS = [f"{DATASET} shard {i:05d} {STAGES}" for i in range(3)]
PLOT_COUNT = 5
WAIT_MS = 30_000


def api_post(api_url: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{api_url}/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_until_recorded(api_url: str, timeout: float = 60.0) -> dict:
    """The card artifact, once the server has recorded every task run and artifact.

    The server records them asynchronously and the UI shows only what it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = api_post(api_url, "task_runs/filter", {})
        artifacts = api_post(api_url, "artifacts/filter", {})
        final = [t for t in tasks if t["state"] and t["state"]["type"] == "COMPLETED"]
        cards = [a for a in artifacts if a["key"] == f"fgid-card-{DATASET}"]
        if len(final) >= len(SHARD_RUNS) + 1 and len(artifacts) >= 3 and cards:
            return cards[0]
        time.sleep(0.5)
    raise TimeoutError(f"server recorded {len(tasks)} task runs, {len(artifacts)} artifacts")


@pytest.fixture(scope="module")
def ui_build(tmp_path_factory, demo_inputs):
    """A Prefect server with its UI on 127.0.0.1, holding one finished lite build."""
    if not shutil.which(CHROMIUM):
        pytest.skip(
            f"no chromium executable at {CHROMIUM}: run `make setup` as root "
            "(installs Debian's chromium) or point FGID_CHROMIUM at one"
        )
    from prefect_server import PrefectServer

    root = tmp_path_factory.mktemp("ui")
    (root / "home").mkdir()
    server = PrefectServer(root / "home", {"PREFECT_UI_ENABLED": "true"})
    # The UI's JavaScript calls the API at this URL (from /ui-settings).
    server.env["PREFECT_UI_API_URL"] = server.api_url
    server.start()
    try:
        out = root / DATASET
        args = ["build", str(demo_inputs), "--out", str(out), "--models", "lite"]
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args, "--shard-size", "4"],
            capture_output=True,
            text=True,
            env=server.env,
            cwd=Path(__file__).resolve().parents[2],
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        card = wait_until_recorded(server.api_url)
        yield server, root, card
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(ui_build, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=shutil.which(CHROMIUM),
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(WAIT_MS)
        yield context
        context.close()


# Both UIs ship with Prefect 3.8: "/" opens V2; the "View at" link a build logs opens V1.
@pytest.mark.parametrize("prefix", ["/v2", ""], ids=["v2", "v1"])
def test_ui_shows_the_build_its_shards_and_artifacts(ui_build, browser, prefix):
    server, root, card = ui_build
    base = server.api_url.removesuffix("/api") + prefix
    page = browser.new_page()
    name = "v2" if prefix else "v1"

    def tab(label: str):
        return page.get_by_role("tablist").get_by_text(label, exact=True)

    def shown(text: str):
        # Hidden tab panels keep their text in the DOM: only what is visible counts.
        return page.get_by_text(text, exact=True).filter(visible=True).first

    page.goto(f"{base}/runs")
    page.get_by_role("link", name=f"build-{DATASET}-lite").first.click()
    tab("Job Variables").wait_for()  # the flow run page, not the list, is showing
    for run_tag in (f"dataset:{DATASET}", "fgid", "build"):
        shown(run_tag).wait_for()

    tab("Task Runs").click()
    for run_name in [*SHARD_RUNS, f"finalize-{DATASET}"]:
        shown(run_name).wait_for()
    page.screenshot(path=root / f"{name}-task-runs.png", full_page=True)

    tab("Artifacts").click()
    shown(f"fgid-summary-{DATASET}").wait_for()
    shown(f"fgid-card-{DATASET}").click()
    page.wait_for_url(re.compile(r"/artifacts/(key|artifact)/"))
    if "/artifacts/key/" in page.url:  # V2 lists the key's versions first
        page.get_by_role("link", name=card["id"][:8]).click()
    page.get_by_role("heading", name="Key numbers").wait_for()
    page.get_by_role("heading", name="Age and gender (estimated)").wait_for()
    # The plots travel inside the Markdown as data: URIs; the UI must decode every one.
    page.wait_for_function(
        "n => [...document.images].filter("
        "i => i.src.startsWith('data:image/png') && i.complete && i.naturalWidth >= 400"
        ").length >= n",
        arg=PLOT_COUNT,
    )
    # V1 scrolls inside a panel, so a full-page shot would miss the plots: bring one into view.
    page.get_by_role("img", name="Age and gender (estimated)").scroll_into_view_if_needed()
    page.screenshot(path=root / f"{name}-card.png")
    assert (root / f"{name}-card.png").stat().st_size > 30_000
    page.close()
