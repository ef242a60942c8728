"""Shared fixtures: an isolated Prefect home, real photos, and the lite model set loaded once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The training fixtures (a real lite build, tiny model folders) serve tests/training and the
# training flows in tests/flows alike; registered here so both see one session-wide copy.
pytest_plugins = ["tests.training.fixtures"]

# Tests never reach a model hub or send analytics.
sys.path.insert(0, str(Path(__file__).parent))  # test helper modules
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
    from fgid.models import load_model_set

    return load_model_set(lite_config)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def prefect_home(tmp_path, monkeypatch):
    """A private Prefect home: its own SQLite database and server; the server stops after."""
    from flows.local_server import stop_server

    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    yield home
    stop_server(home)  # the server a CLI run in this home started, kept for later runs


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory):
    """The demo folder of real photos (fgid samples): faces, duplicates, a no-face, a bad file."""
    from fgid.samples import write_samples

    folder = tmp_path_factory.mktemp("demo-inputs")
    write_samples(folder)
    return folder


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on 127.0.0.1, shared by the slow flow tests, stopped at the end."""
    from prefect_server import PrefectServer

    home = tmp_path_factory.mktemp("prefect") / "home"
    home.mkdir()
    server = PrefectServer(home).start()
    yield server
    # Flush what in-process flows queued for the API first, or exit hangs retrying a closed port.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()
    server.stop()


@pytest.fixture(scope="session")
def full_config(tmp_path_factory):
    """The full model set on tiny models built here under the real file names and formats."""
    from fgid.config import BuildConfig
    from tests.tiny_full_models import (
        build_bisenet_weights,
        build_insightface_pack,
        build_tiny_llava,
    )

    root = tmp_path_factory.mktemp("weights")
    return BuildConfig(
        shard_size=3,
        batch_size=2,
        models={
            "set": "full",
            "insightface_root": str(build_insightface_pack(root / "insightface")),
            "facexlib_root": str(build_bisenet_weights(root / "facexlib")),
            "llava": str(build_tiny_llava(root / "llava")),
            "device": "cpu",
        },
        caption={"max_new_tokens": 8},
        detect={"min_face_size": 8},
    )
