"""Training fixtures (registered for every test by tests/conftest.py): a real lite build to stream
from, and tiny model folders built offline."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.training import tiny_models


@pytest.fixture(scope="session")
def built_dataset(tmp_path_factory, lite_config, request):
    """A finished lite build (no Prefect) of five people with several photos each: real shards,
    Parquet indexes and identities.parquet, 128-d dlib embeddings, template captions.

    FGID_BUILT_DATASET names such a build made elsewhere, for a machine without the lite models'
    weights (the GPU check's image has no dlib): it is copied, never written to."""
    from fgid.pipeline import build
    from tests.corpus import make_identity_corpus

    prepared = os.environ.get("FGID_BUILT_DATASET")
    if prepared:
        out = tmp_path_factory.mktemp("training-dataset") / "prepared"
        shutil.copytree(prepared, out)
        return out
    lite_models = request.getfixturevalue("lite_models")
    inputs = tmp_path_factory.mktemp("training-inputs")
    make_identity_corpus(inputs)
    out = tmp_path_factory.mktemp("training-dataset")
    build([str(inputs)], str(out), lite_config, lite_models)
    return out


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    return tiny_models.save_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    return tiny_models.build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return tiny_models.build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return tiny_models.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    return tiny_models.build_tiny_dino(tmp_path_factory.mktemp("tiny-dino"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waits can make each step many times slower: a module asks for one thread
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
