"""Shared fixtures: an isolated Prefect home, real photos, and the lite model set loaded once."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub or send analytics.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def lite_config():
    from fgid.config import BuildConfig

    return BuildConfig(models={"set": "lite"}, shard_size=4, batch_size=4)


@pytest.fixture(scope="session")
def lite_models(lite_config):
    from fgid.models import cached_model_set

    return cached_model_set(lite_config)
