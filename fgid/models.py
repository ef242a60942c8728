"""Choose and load a model set by config; one loaded set per process, reused for every shard."""

from __future__ import annotations

import threading

from fgid.config import BuildConfig
from fgid.protocols import ModelSet

_cache: dict[str, ModelSet] = {}
_lock = threading.Lock()


def load_model_set(config: BuildConfig) -> ModelSet:
    """Build the backends named by `config.models.set`. Heavy imports happen in the backend."""
    if config.models.set == "lite":
        from fgid.backends import lite

        return lite.load(config)
    from fgid.backends import full

    return full.load(config)


def cached_model_set(config: BuildConfig) -> ModelSet:
    """The process-wide model set for this config (loaded on first use)."""
    key = config.models.model_dump_json() + config.detect.model_dump_json()
    with _lock:
        if key not in _cache:
            _cache[key] = load_model_set(config)
        return _cache[key]
