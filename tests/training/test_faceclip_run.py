"""`train_faceclip` end to end on a real build: align, resume, then the SDXL stage."""

from __future__ import annotations

import json

import pytest

from training.checkpoints import list_checkpoints
from training.faceclip.config import FaceViTConfig, FuserConfig, TowerConfig
from training.faceclip.train import FaceCLIPTrainConfig, train_faceclip
from training.loader import LoaderConfig
from training.loop import TrainConfig


def _config(dataset, tiny_sdxl, tiny_clip, out, stage="align", max_steps=4, **kw):
    return FaceCLIPTrainConfig(
        stage=stage,
        dataset_url=str(dataset),
        base_model=str(tiny_sdxl),
        image_model=str(tiny_clip),
        face_vit=FaceViTConfig.tiny(),
        fuser=FuserConfig.tiny(),
        towers=[TowerConfig.tiny(32), TowerConfig.tiny(64)],
        loader=LoaderConfig(
            batch_size=4, resolution=32, clip_size=32, workers=0, shuffle_buffer=8, seed=3
        ),
        train=TrainConfig(
            output_dir=str(out),
            max_steps=max_steps,
            mixed_precision="no",
            learning_rate=1e-3,
            checkpoint_every=2,
            checkpoints_limit=2,
            log_every=1,
        ),
        **kw,
    )


@pytest.fixture(scope="module")
def align_run(built_dataset, tiny_sdxl, tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("faceclip-align")
    result = train_faceclip(_config(built_dataset, tiny_sdxl, tiny_clip, out))
    return out, result


def test_align_stage_writes_checkpoints_and_export(align_run):
    out, result = align_run
    assert result.step == 4 and len(result.losses) == 4
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    final = result.final_dir
    assert (final / "encoder" / "encoder.safetensors").is_file()
    assert (final / "alignment.safetensors").is_file()
    run = json.loads((final / "faceclip.json").read_text())
    assert run["stage"] == "align" and run["encoder"]["fuser"]["depth"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss_face", "loss_text", "loss_image"} <= set(rows[0])


def test_resume_continues_at_the_same_step_with_the_same_data(
    align_run, built_dataset, tiny_sdxl, tiny_clip, tmp_path
):
    _, full = align_run
    first = train_faceclip(_config(built_dataset, tiny_sdxl, tiny_clip, tmp_path, max_steps=2))
    assert first.step == 2
    resumed = train_faceclip(_config(built_dataset, tiny_sdxl, tiny_clip, tmp_path, max_steps=4))
    assert resumed.start_step == 2 and resumed.step == 4
    assert resumed.resumed_from.name == "checkpoint-2"
    # Same batches and same weights from step 2 on: the losses of steps 3 and 4 agree.
    assert first.losses == pytest.approx(full.losses[:2], rel=1e-5)
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5)


def test_sdxl_stage_trains_on_the_align_export(
    align_run, built_dataset, tiny_sdxl, tiny_clip, tmp_path
):
    _, align = align_run
    config = _config(
        built_dataset,
        tiny_sdxl,
        tiny_clip,
        tmp_path,
        stage="sdxl",
        max_steps=2,
        encoder_weights=str(align.final_dir),
    )
    result = train_faceclip(config)
    assert result.step == 2
    final = result.final_dir
    assert (final / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (final / "encoder" / "encoder.safetensors").read_bytes() == (
        align.final_dir / "encoder" / "encoder.safetensors"
    ).read_bytes()
    assert json.loads((final / "faceclip.json").read_text())["stage"] == "sdxl"


def test_sdxl_stage_needs_the_align_export(built_dataset, tiny_sdxl, tiny_clip, tmp_path):
    config = _config(built_dataset, tiny_sdxl, tiny_clip, tmp_path, stage="sdxl")
    with pytest.raises(ValueError, match="encoder_weights"):
        train_faceclip(config)
