"""Headless Chromium sees builds in the Prefect UI: a finished one (its run, shard task runs, tags,
artifacts), a failed one (the failure artifact names the cause) and a running one (its progress
artifact moves)."""

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
BROKEN = "ui-broken"
RUNNING = "ui-running"
SHARD_RUNS = [f"{DATASET} shard {i:05d}" for i in range(3)]
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


def artifact(api_url: str, key: str) -> dict | None:
    """The latest version of the artifact with `key`, or None."""
    found = api_post(api_url, "artifacts/filter", {"artifacts": {"key": {"any_": [key]}}})
    return max(found, key=lambda a: a["created"]) if found else None


def wait_until_recorded(api_url: str, timeout: float = 60.0) -> dict:
    """The card artifact, once the server has recorded every task run and artifact.

    The server records them asynchronously and the UI shows only what it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = api_post(api_url, "task_runs/filter", {})
        final = [t for t in tasks if t["state"] and t["state"]["type"] == "COMPLETED"]
        card = artifact(api_url, f"fgid-card-{DATASET}")
        failure = artifact(api_url, f"fgid-failure-{BROKEN}")
        if len(final) >= len(SHARD_RUNS) + 1 and card and failure:
            return card
        time.sleep(0.5)
    raise TimeoutError(f"server recorded {len(tasks)} task runs, no card or failure artifact")


def fgid_build(server, inputs: Path, out: Path, *extra: str, wait: bool = True):
    """`fgid build` in a process of its own, as an operator runs it."""
    args = ["build", str(inputs), "--out", str(out), "--models", "lite", *extra]
    command = [sys.executable, "-m", "flows.cli", *args]
    where = {"env": server.env, "cwd": Path(__file__).resolve().parents[2]}
    if not wait:
        log = open(out.parent / f"{out.name}.log", "wb")  # noqa: SIM115 - lives with the process
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **where)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **where)


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
        done = fgid_build(server, demo_inputs, root / DATASET, "--shard-size", "4")
        assert done.returncode == 0, done.stderr[-3000:]
        # A directory where shard 00001's tar must go: its rename fails (EISDIR), as root too.
        (root / BROKEN / "shards" / "00001.tar").mkdir(parents=True)
        failed = fgid_build(server, demo_inputs, root / BROKEN, "--shard-size", "4")
        assert failed.returncode == 1, failed.stderr[-3000:]
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


def open_run(page, base: str, run_name: str) -> None:
    page.goto(f"{base}/runs")
    page.get_by_role("link", name=run_name).first.click()
    page.get_by_role("tablist").get_by_text("Job Variables", exact=True).wait_for()


@pytest.mark.parametrize("prefix", ["/v2", ""], ids=["v2", "v1"])
def test_ui_names_the_cause_of_a_failed_build(ui_build, browser, prefix):
    server, root, _ = ui_build
    base = server.api_url.removesuffix("/api") + prefix
    page = browser.new_page()
    name = "v2" if prefix else "v1"
    open_run(page, base, f"build-{BROKEN}-lite")
    # The run's state message says which shard failed and why.
    page.get_by_text("IsADirectoryError").first.wait_for()
    page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
    page.get_by_text(f"fgid-failure-{BROKEN}", exact=True).filter(visible=True).first.click()
    page.wait_for_url(re.compile(r"/artifacts/(key|artifact)/"))
    if "/artifacts/key/" in page.url:  # V2 lists the key's versions first
        failure = artifact(server.api_url, f"fgid-failure-{BROKEN}")
        page.get_by_role("link", name=failure["id"][:8]).click()
    page.get_by_role("heading", name=re.compile(f"Build {BROKEN} failed: 1 shard")).wait_for()
    page.get_by_role("cell", name="00001", exact=True).wait_for()
    page.get_by_text("IsADirectoryError: [Errno 21] Is a directory").first.wait_for()
    page.get_by_text(re.compile(f"fgid build .* --out .*{BROKEN}")).first.wait_for()
    page.screenshot(path=root / f"{name}-failure.png", full_page=True)
    # The run's shard table: each shard's state, counts, rejections by reason, time and error.
    shards = artifact(server.api_url, f"fgid-shards-{BROKEN}")
    page.goto(f"{base}/artifacts/artifact/{shards['id']}")
    page.get_by_text("seconds (with model load)").first.wait_for()
    page.get_by_text("done before this run").or_(page.get_by_text("built")).first.wait_for()
    page.get_by_text("failed", exact=True).first.wait_for()
    page.screenshot(path=root / f"{name}-shards.png", full_page=True)
    page.close()


def test_ui_progress_moves_while_a_build_runs(ui_build, browser, demo_inputs, tmp_path):
    server, root, _ = ui_build
    base = server.api_url.removesuffix("/api") + "/v2"
    # Three copies of the demo photos in shards of two: long enough to watch it move.
    inputs = tmp_path / "inputs"
    for copy in range(3):
        shutil.copytree(demo_inputs, inputs / f"copy-{copy}")
    build = fgid_build(server, inputs, root / RUNNING, "--shard-size", "2", wait=False)
    page = browser.new_page()
    try:
        key = f"fgid-progress-{RUNNING}"
        deadline = time.monotonic() + 180
        while (bar := artifact(server.api_url, key)) is None and time.monotonic() < deadline:
            assert build.poll() is None, (root / f"{RUNNING}.log").read_text()[-3000:]
            time.sleep(0.5)
        assert bar is not None, (root / f"{RUNNING}.log").read_text()[-3000:]
        seen = []
        shown = re.compile(r"running: (\d+) of 15 shards, (\d+) of 30 inputs")
        while len(seen) < 2 and build.poll() is None:
            page.goto(f"{base}/artifacts/artifact/{bar['id']}")
            text = page.get_by_text(shown).first
            text.wait_for()
            inputs_done = int(shown.search(text.inner_text()).group(2))
            if not seen or inputs_done > seen[-1]:
                seen.append(inputs_done)
                page.screenshot(path=root / f"v2-progress-{len(seen)}.png", full_page=True)
            time.sleep(2)
        assert len(seen) == 2 and seen[1] > seen[0], seen
    finally:
        page.close()
        returncode = build.wait(timeout=300)
    assert returncode == 0, (root / f"{RUNNING}.log").read_text()[-3000:]
    done = artifact(server.api_url, key)
    assert done["data"] == 100 and done["description"].startswith("completed: 15 of 15 shards")
