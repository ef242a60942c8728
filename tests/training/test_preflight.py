"""Training and evaluation refuse a dataset they cannot use, and report every missing weight,
before any model loads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fgid.weights import MissingWeights
from training.preflight import DatasetUnusable, check_consistentid, check_evaluation
from training.weights import inception_path

TRAIN = {"output_dir": "unused", "max_steps": 1, "mixed_precision": "no"}


@pytest.fixture(autouse=True)
def own_caches(tmp_path, monkeypatch):
    """Empty model caches of our own, and no hub."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def consistentid(dataset, base, output, **extra):
    from training.consistentid.train import ConsistentIDTrainConfig

    train = TRAIN | {"output_dir": str(output)}
    return ConsistentIDTrainConfig(
        dataset_url=str(dataset), base_model=str(base), train=train, **extra
    )


@pytest.fixture(scope="module")
def empty_dataset(tmp_path_factory, lite_config, lite_models):
    """A real build in which no photo has a face: every input rejected, nothing to train on."""
    from fgid.pipeline import build

    inputs = tmp_path_factory.mktemp("no-faces")
    for i in range(2):
        Image.fromarray(np.full((96, 96, 3), 40 * i, np.uint8)).save(inputs / f"flat{i}.png")
    out = tmp_path_factory.mktemp("empty-dataset")
    build([str(inputs)], str(out), lite_config, lite_models)
    return out


def test_consistentid_refuses_a_lite_build_before_loading(built_dataset, tmp_path):
    from training.consistentid.train import train_consistentid

    output = tmp_path / "run"
    # The base model does not exist either: the dataset is refused first, nothing is loaded.
    config = consistentid(built_dataset, tmp_path / "no-such-sd", output)
    with pytest.raises(DatasetUnusable) as refused:
        train_consistentid(config)
    message = str(refused.value)
    assert "\n" not in message and "512-d" in message and "128-d" in message
    assert "--models full" in message and "id_dim=128" in message
    assert not output.exists()
    with pytest.raises(DatasetUnusable, match="id_dim=256 but .* 128-d"):
        check_consistentid(consistentid(built_dataset, tmp_path, output, id_dim=256))


def test_an_empty_or_unbuilt_dataset_is_refused(empty_dataset, tmp_path):
    with pytest.raises(DatasetUnusable, match="has no kept samples .*fgid inspect"):
        check_consistentid(consistentid(empty_dataset, tmp_path, tmp_path / "run", id_dim=128))
    with pytest.raises(DatasetUnusable, match="is not a finished fgid build"):
        check_consistentid(consistentid(tmp_path, tmp_path, tmp_path / "run"))


def test_every_missing_training_weight_is_reported_at_once(built_dataset, tiny_sd15, tmp_path):
    config = consistentid(built_dataset, tmp_path / "no-such-sd", tmp_path / "run", id_dim=128)
    with pytest.raises(MissingWeights) as missing:
        check_consistentid(config)
    names = [m.name for m in missing.value.missing]
    # No image_encoder/ in a missing folder: ViT-H/14 from the hub, not in the (empty) cache.
    assert names == ["Stable Diffusion 1.5", "CLIP ViT-H/14 image encoder"]
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in str(missing.value)
    assert "fgid models download clip-h" in str(missing.value)
    # The tiny SD 1.5 folder (with an image_encoder/) holds everything.
    ok = consistentid(built_dataset, tiny_sd15, tmp_path / "run", id_dim=128)
    assert check_consistentid(ok) == 128


def test_faceclip_reports_a_missing_face_encoder_file(
    built_dataset, tiny_sdxl, tiny_clip, tmp_path
):
    from training.faceclip.train import FaceCLIPTrainConfig
    from training.preflight import check_faceclip

    config = FaceCLIPTrainConfig(
        dataset_url=str(built_dataset),
        base_model=str(tiny_sdxl),
        image_model=str(tiny_clip),
        train=TRAIN,
    )
    check_faceclip(config)  # tiny folders count; no face encoder = a random one, on purpose
    with pytest.raises(MissingWeights, match="face encoder .*vit-l.pt not found"):
        check_faceclip(config.model_copy(update={"face_encoder": str(tmp_path / "vit-l.pt")}))


def test_evaluation_checks_its_backbones_and_fid_weights(
    built_dataset, tiny_sd15, tiny_clip, tiny_dino, tmp_path
):
    from training.evaluation.config import EvaluateConfig

    metrics = {"clip": str(tiny_clip), "dino": str(tiny_dino), "faces": {"set": "lite"}}
    config = EvaluateConfig(
        dataset_url=str(built_dataset),
        out_dir=str(tmp_path / "eval"),
        generator={"base_model": str(tiny_sd15)},
        metrics=metrics | {"fid": "dino"},
    )
    check_evaluation(config)
    inception = config.model_copy(
        update={"metrics": config.metrics.model_copy(update={"fid": "inception"})}
    )
    with pytest.raises(MissingWeights) as missing:
        check_evaluation(inception)
    assert [m.name for m in missing.value.missing] == ["FID Inception-v3 (pytorch-fid)"]
    assert str(inception_path()) in str(missing.value)
    assert str(tmp_path / "torch-home") in str(inception_path())
    inception_path().parent.mkdir(parents=True)
    inception_path().write_bytes(b"weights")
    check_evaluation(inception)


def test_the_train_command_refuses_in_one_line_before_any_work(built_dataset, tmp_path, capsys):
    from flows.cli import app
    from flows.cli_common import run_cli

    output = tmp_path / "run"
    code = run_cli(
        app,
        ["train", "consistentid", "--dataset", str(built_dataset), "--output-dir", str(output),
         "--base-model", str(tmp_path / "none"), "--set", "loader.batch_size=2", "--no-prefect"],
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert "ConsistentID needs 512-d" in err and not output.exists()
