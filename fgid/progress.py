"""Shard-completion events, so a CLI progress bar works the same with or without Prefect."""

from __future__ import annotations

import threading
from collections.abc import Callable

Listener = Callable[[dict], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call `listener(stats)` after each finished shard; returns an unsubscribe function."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def shard_finished(stats: dict) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(stats)
