from __future__ import annotations

import threading

from fgid import models as registry
from fgid.config import BuildConfig


def test_leases_give_concurrent_workers_their_own_set_and_reuse_it(monkeypatch):
    loads = []
    monkeypatch.setattr(registry, "load_model_set", lambda cfg: loads.append(object()) or loads[-1])
    monkeypatch.setattr(registry, "_idle", {})
    config = BuildConfig(models={"set": "lite"})
    with registry.leased_model_set(config) as first, registry.leased_model_set(config) as second:
        assert first is not second  # two shards side by side never share model state
    with registry.leased_model_set(config) as again:
        assert again in (first, second)
    assert len(loads) == 2

    seen, barrier = [], threading.Barrier(2)

    def worker():
        with registry.leased_model_set(config) as models:
            barrier.wait()
            seen.append(models)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(m) for m in seen}) == 2 and len(loads) == 2  # reused, not reloaded
    other = BuildConfig(models={"set": "lite"}, detect={"upsample": 0})
    with registry.leased_model_set(other):
        assert len(loads) == 3  # another detector setting is another set
