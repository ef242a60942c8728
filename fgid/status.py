"""Where a build stands: shards and inputs done of planned, rejections, rate, ETA, its run.

While a build runs, a `StatusRecorder` (a fgid.progress listener) keeps a small status file in
the dataset up to date, at most every few seconds, and removes it when the build succeeds (a
failed or killed run leaves it, with how far it got and its Prefect run); `build_status`
combines it with what the shards' stats say, so `fgid status OUT` answers for a running, an
interrupted or a finished build alike, from any process.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import storage
from fgid import progress
from fgid.dataset import STATUS_FILE, SUMMARY_FILE, Dataset, write_json
from fgid.progress import Tracker
from storage.lock import holder

WRITE_EVERY_SECONDS = 5.0


def _now_iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


class StatusRecorder:
    """Listens to progress events and writes the dataset's status file, throttled."""

    def __init__(self, dataset: Dataset, planned_inputs: int, run_url: str | None = None):
        self.dataset, self.planned, self.run_url = dataset, planned_inputs, run_url
        self.tracker = Tracker()
        self.started = time.time()
        self._last_write = 0.0
        self._lock = threading.Lock()
        self.write(final=False)

    def __call__(self, kind: str, payload: dict) -> None:
        self.tracker(kind, payload)
        if time.monotonic() - self._last_write >= WRITE_EVERY_SECONDS or kind != "batch":
            self.write(final=False)

    def write(self, final: bool) -> None:
        with self._lock:
            self._last_write = time.monotonic()
            t = self.tracker
            write_json(
                self.dataset.path(STATUS_FILE),
                {
                    "started": _now_iso(self.started),
                    "started_ts": self.started,
                    "updated_ts": time.time(),
                    "planned_inputs": self.planned,
                    "inputs_done": t.inputs,
                    "inputs_this_run": t.inputs - t.skipped,
                    "rejected": t.rejected,
                    "run_url": self.run_url,
                    "ended": final,
                },
            )


def _read_status_file(dataset: Dataset) -> dict:
    try:
        return json.loads(storage.read_text(dataset.path(STATUS_FILE)))
    except (FileNotFoundError, ValueError):
        return {}


def build_status(dataset: Dataset) -> dict:
    """The state of the build in `dataset`: running, interrupted or finished, with figures."""
    shards = dataset.outline()
    planned_inputs = sum(p.size for p in shards)
    stats = dataset.all_stats()
    done_inputs = sum(s["inputs"] for s in stats.values())
    rejected = sum(s["rejected"] for s in stats.values())
    recorded = _read_status_file(dataset)
    owner = holder(dataset.root)
    if owner is not None:
        # The running build's own count includes its unfinished shards' finished batches.
        done_inputs = max(done_inputs, int(recorded.get("inputs_done", 0)))
        rejected = max(rejected, int(recorded.get("rejected", 0)))
    finished = len(stats) == len(shards) and storage.exists(dataset.path(SUMMARY_FILE))
    state = "running" if owner else ("finished" if finished else "interrupted")
    rate = eta = None
    if state == "running" and recorded.get("inputs_this_run") and recorded.get("updated_ts"):
        elapsed = float(recorded["updated_ts"]) - float(recorded["started_ts"])
        if elapsed > 0:
            rate = recorded["inputs_this_run"] / elapsed
    if rate:
        eta = (planned_inputs - done_inputs) / rate
    return {
        "dataset": dataset.root,
        "state": state,
        "holder": owner,
        "shards_done": len(stats),
        "shards_planned": len(shards),
        "inputs_done": done_inputs,
        "inputs_planned": planned_inputs,
        "rejected": rejected,
        "inputs_per_second": round(rate, 3) if rate else None,
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "last_run_started": recorded.get("started"),
        "run_url": recorded.get("run_url"),
    }


@contextlib.contextmanager
def recording(dataset: Dataset, plans: list, run_url: str | None = None) -> Iterator[None]:
    """Keep the dataset's status file current while the body builds `plans`."""
    recorder = StatusRecorder(dataset, sum(p.size for p in plans), run_url)
    unsubscribe = progress.subscribe(recorder)
    try:
        yield
    except BaseException:
        unsubscribe()
        recorder.write(final=True)  # what the failed run got to, and where its run is
        raise
    unsubscribe()
    # A finished build's state is in its shards and summary; a rerun then changes no file.
    storage.remove(dataset.path(STATUS_FILE))
