"""Build progress events, so a CLI progress bar works the same with or without Prefect.

The plan is reported once inputs are listed (`planned`). A shard's inputs are reported as each
batch finishes (`batch_finished`), and the shard as a
whole when it is committed (`shard_finished`), found already done (`shard_skipped`) or given
up after its retries (`shard_failed`, which takes its batches back out of the count). Batch
events only reach listeners in the process that builds the shard; under Dask the flow reports
the shard when its result arrives, and `Tracker` counts each input once either way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Listener = Callable[[str, dict], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call `listener(kind, payload)` for every event; returns an unsubscribe function."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def _emit(kind: str, payload: dict) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(kind, payload)


def planned(inputs: int, shards: int) -> None:
    """The build's plan is known: how many inputs and shards it has (listing comes first)."""
    _emit("planned", {"inputs": inputs, "shards": shards})


def batch_finished(shard: int, inputs: int, rejected: int) -> None:
    _emit("batch", {"shard": shard, "inputs": inputs, "rejected": rejected})


def shard_finished(stats: dict) -> None:
    _emit("shard", stats)


def shard_skipped(stats: dict) -> None:
    _emit("skipped", stats)


def shard_failed(shard: int) -> None:
    """The shard failed for good: its finished batches are not done inputs after all."""
    _emit("failed", {"shard": shard, "inputs": 0, "rejected": 0})


class Tracker:
    """Inputs and rejections seen so far, each input counted once whatever events arrive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[int, list[int]] = {}  # shard -> [inputs, rejected] from batch events
        self.inputs = 0
        self.rejected = 0
        self.skipped = 0  # inputs of shards already done before this run
        self.shards_done = 0

    def __call__(self, kind: str, payload: dict) -> int:
        """Record one event; returns how many inputs it added."""
        with self._lock:
            if kind == "planned":
                return 0
            if kind == "batch":
                seen = self._seen.setdefault(payload["shard"], [0, 0])
                seen[0] += payload["inputs"]
                seen[1] += payload["rejected"]
                return self._add(payload["inputs"], payload["rejected"])
            seen = self._seen.pop(payload["shard"], [0, 0])
            if kind == "failed":
                return self._add(-seen[0], -seen[1])
            self.shards_done += 1
            added = self._add(payload["inputs"] - seen[0], payload["rejected"] - seen[1])
            if kind == "skipped":
                self.skipped += payload["inputs"]
            return added

    def _add(self, inputs: int, rejected: int) -> int:
        self.inputs += inputs
        self.rejected += rejected
        return inputs
