"""The build's weight registry on real folders: present and absent files, the HF cache, and the
missing-weights report that comes before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fgid.config import BuildConfig
from fgid.weights import MissingWeights, check_weights, model_present, transformers_files
from tests.tiny_full_models import build_bisenet_weights, build_insightface_pack

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of our own: nothing on this machine's cache counts."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_files(cache: Path, repo: str, files: dict[str, str]) -> None:
    """Files of `repo` in the cache's own layout: refs/main -> snapshots/<commit>/..."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for name, text in files.items():
        path = folder / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def full(tmp_path: Path, **models) -> BuildConfig:
    settings = {
        "set": "full",
        "insightface_root": str(tmp_path / "insightface"),
        "facexlib_root": str(tmp_path / "facexlib"),
        "llava": "llava-hf/llava-1.5-7b-hf",
    }
    return BuildConfig(models=settings | models)


def test_every_missing_weight_is_named_with_its_file_setting_and_command(tmp_path, hub_cache):
    missing = check_weights(full(tmp_path))
    assert [Path(m.where.split()[0]).name for m in missing] == [
        "det_10g.onnx", "w600k_r50.onnx", "genderage.onnx", "parsing_bisenet.pth",
        "llava-1.5-7b-hf",
    ]  # fmt: skip
    assert {m.setting for m in missing} == {
        "models.insightface_root",
        "models.facexlib_root",
        "models.llava",
    }
    pack = tmp_path / "insightface" / "models" / "buffalo_l"
    assert str(pack / "det_10g.onnx") in missing[0].where
    # An explicit root goes into the command, so it downloads to where the build looks.
    root = tmp_path / "insightface"
    assert (
        missing[0].command
        == f"fgid models download insightface --set models.insightface_root={root}"
    )
    assert missing[-1].command == "fgid models download llava"
    message = str(MissingWeights(missing))
    assert message.splitlines()[0] == "5 model weights missing, nothing was loaded:"
    assert len(message.splitlines()) == 6


def test_weights_built_locally_are_present(tmp_path, hub_cache):
    from tests.tiny_full_models import build_tiny_llava

    build_insightface_pack(tmp_path / "insightface")
    build_bisenet_weights(tmp_path / "facexlib")
    llava = build_tiny_llava(tmp_path / "llava")
    assert check_weights(full(tmp_path, llava=str(llava))) == []
    (tmp_path / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx").unlink()
    assert [m.name for m in check_weights(full(tmp_path, llava=str(llava)))] == [
        "InsightFace recogniser (ArcFace R50)"
    ]
    assert check_weights(BuildConfig(models={"set": "lite"})) == []


def test_hub_models_are_found_in_the_local_cache_with_every_shard(hub_cache):
    repo = "llava-hf/llava-1.5-7b-hf"
    required = transformers_files()
    assert not model_present(repo, required)
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    files = {"config.json": "{}", "model.safetensors.index.json": json.dumps(index)}
    cache_files(hub_cache, repo, files | {"model-1.safetensors": "x"})
    assert not model_present(repo, required)  # a half-finished download is not the model
    cache_files(hub_cache, repo, {"model-2.safetensors": "x"})
    assert model_present(repo, required)
    assert check_weights(BuildConfig(models={"llava": repo}))[-1].name != "LLaVA-1.5-7B captioner"


def test_load_model_set_reports_all_missing_weights_before_any_heavy_import(tmp_path):
    script = f"""
import sys
from fgid.config import BuildConfig
from fgid.models import load_model_set
from fgid.weights import MissingWeights
config = BuildConfig(models={{"insightface_root": {str(tmp_path)!r},
                              "facexlib_root": {str(tmp_path)!r}, "llava": {str(tmp_path)!r}}})
try:
    load_model_set(config)
except MissingWeights as error:
    heavy = [m for m in ("torch", "onnxruntime", "insightface", "transformers") if m in sys.modules]
    print(len(error.missing), heavy)
"""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert done.stdout.strip() == "5 []", done.stderr[-2000:]
