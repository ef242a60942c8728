"""Load only the captioner of a model set, once per concurrent worker, for caption runs."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from fgid.config import BuildConfig
from fgid.protocols import Captioner


def load_captioner(config: BuildConfig) -> Captioner:
    """The captioner `config.models.set` names; heavy imports happen in the backend."""
    if config.models.set == "lite":
        from fgid.backends.lite.template_captioner import TemplateCaptioner

        return TemplateCaptioner()
    from fgid.backends.full.device import torch_device
    from fgid.backends.full.llava import LlavaCaptioner

    return LlavaCaptioner(config, torch_device(config.models.device))


_idle: dict[str, list[Captioner]] = {}
_lock = threading.Lock()


@contextlib.contextmanager
def leased_captioner(config: BuildConfig) -> Iterator[Captioner]:
    """Borrow an idle captioner for this config (one per concurrent shard, as fgid.models)."""
    key = config.models.model_dump_json() + config.caption.model_dump_json()
    with _lock:
        idle = _idle.setdefault(key, [])
        captioner = idle.pop() if idle else None
    if captioner is None:
        captioner = load_captioner(config)
    try:
        yield captioner
    finally:
        with _lock:
            _idle[key].append(captioner)
