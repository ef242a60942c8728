"""Choose and load a model set by config; loaded once per concurrent worker, then reused."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from fgid.config import BuildConfig
from fgid.protocols import ModelSet
from fgid.weights import MissingWeights, check_weights

_idle: dict[str, list[ModelSet]] = {}
_lock = threading.Lock()


def load_model_set(config: BuildConfig) -> ModelSet:
    """Build the backends named by `config.models.set`. Heavy imports happen in the backend.

    Every weight the set needs is checked first, so a missing one is reported (all of them at
    once, with the setting and the command that fetches each) before anything loads."""
    missing = check_weights(config)
    if missing:
        raise MissingWeights(missing)
    if config.models.set == "lite":
        from fgid.backends import lite

        return lite.load(config)
    from fgid.backends import full

    return full.load(config)


def _key(config: BuildConfig) -> str:
    # Everything a backend reads at load time: a set loaded for another caption engine or
    # generation length must not be lent to this build.
    sections = (config.models, config.detect, config.caption)
    return "".join(section.model_dump_json() for section in sections)


@contextlib.contextmanager
def leased_model_set(config: BuildConfig) -> Iterator[ModelSet]:
    """Borrow an idle model set for this config, loading one only if none is idle.

    Model objects keep per-call state (dlib's DNN holds its layer outputs, torch modules their
    buffers), so two shards built side by side must not share one; a lease gives each concurrent
    worker its own, and returning it lets the next shard (or the next flow run in the same
    process) reuse it instead of loading again."""
    key = _key(config)
    with _lock:
        idle = _idle.setdefault(key, [])
        models = idle.pop() if idle else None
    if models is None:
        models = load_model_set(config)
    try:
        yield models
    finally:
        with _lock:
            _idle[key].append(models)
