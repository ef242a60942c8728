"""FaceCLIP training on tiny models: both stages learn one fixed real batch through the loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from training.faceclip.align import AlignmentModel, load_image_model
from training.faceclip.config import EncoderConfig
from training.faceclip.encoder import FaceCLIPEncoder
from training.faceclip.sdxl import FaceCLIPSDXL
from training.loader import LoaderConfig, faceclip_loader
from training.loop import TrainConfig, train


def loader_config(**kw) -> LoaderConfig:
    # resolution 32: the tiny VAE halves it and the two-level UNet halves it again
    base = dict(batch_size=4, resolution=32, clip_size=32, workers=0, shuffle_buffer=8)
    return LoaderConfig(**(base | kw))


@pytest.fixture(scope="module")
def batch(built_dataset):
    batch = next(iter(faceclip_loader(str(built_dataset), loader_config())))
    # The identity-aware pairs of the build: the batch must repeat an identity to be a test.
    assert len(set(batch["identity"])) < len(batch["identity"])
    return batch


def encoder_config(tiny_sdxl) -> EncoderConfig:
    return EncoderConfig.tiny()


def _train_on(model, batch, tmp_path, steps: int, lr: float):
    config = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=steps,
        mixed_precision="no",
        learning_rate=lr,
        weight_decay=0.0,
        checkpoint_every=steps,
        resume_from=None,
        log_every=1,
    )
    return train(model, lambda m, b: m(b), lambda start: itertools.repeat(batch), config)


def test_batch_matches_the_contract(batch):
    assert batch["ref_face_112"].shape == (4, 3, 112, 112)
    assert batch["ref_face_112"].min() >= -1.0 and batch["ref_face_112"].max() <= 1.0
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["clip_pixel_values"].shape == (4, 3, 32, 32)
    assert batch["original_size"].shape == batch["crop_top_left"].shape == (4, 2)
    assert len(batch["caption"]) == 4 and all(batch["caption"])


def test_alignment_overfits_one_batch(tiny_sdxl, tiny_clip, batch, tmp_path):
    torch.manual_seed(0)
    encoder = FaceCLIPEncoder.build(encoder_config(tiny_sdxl))
    model = AlignmentModel(encoder, load_image_model(str(tiny_clip)))
    assert set(model.spaces) == {"face", "text", "image"}
    result = _train_on(model, batch, tmp_path, steps=6, lr=3e-3)
    assert result.losses[-1] < 0.5 * result.losses[0]
    # The towers keep the released layout; only fuser, projections and heads are trained.
    trained = {n.split(".")[3] if n.startswith("encoder.") else "spaces"
               for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip
    assert trained == {"spaces", "proj1", "face_patch_proj", "face_pos_proj",
                       "text_embed_proj", "text_pos_proj", "fuser"}  # fmt: skip
    assert not any(n.startswith("frozen") for n in model.state_dict())


def test_image_branches_use_each_towers_own_scale_and_bias(tiny_sdxl, batch):
    from training.faceclip.released import ImageBranch

    encoder = FaceCLIPEncoder.build(encoder_config(tiny_sdxl))
    branches = [ImageBranch(t) for t in encoder.config.towers]
    model = AlignmentModel(encoder, None, None, branches)
    loss, logs = model(batch)
    assert {"loss_tower0_image", "loss_tower1_image"} <= set(logs)
    loss.backward()
    assert all(t.logit_scale.grad is not None and t.logit_bias.grad is not None
               for t in encoder.towers)  # fmt: skip


def _fixed_loss(model: FaceCLIPSDXL, batch, seeds=range(2)) -> float:
    """The loss at fixed noise and timesteps, with every condition kept."""
    drop, model.condition_drop = model.condition_drop, 0.0
    losses = []
    with torch.no_grad(), torch.random.fork_rng():
        for seed in seeds:
            torch.manual_seed(seed)
            losses.append(float(model(batch)[0]))
    model.condition_drop = drop
    return sum(losses) / len(losses)


def test_sdxl_fine_tune_lowers_the_loss(tiny_sdxl, batch, tmp_path):
    torch.manual_seed(0)
    FaceCLIPEncoder.build(encoder_config(tiny_sdxl)).save_pretrained(tmp_path / "align")
    model = FaceCLIPSDXL.build(str(tiny_sdxl), tmp_path / "align", condition_drop=0.1)
    assert {n.split(".")[0] for n in model.state_dict()} == {"unet"}
    vae_before = next(model.frozen("vae").parameters()).clone()
    before = _fixed_loss(model, batch)
    result = _train_on(model, batch, tmp_path / "run", steps=5, lr=2e-3)
    after = _fixed_loss(model, batch)
    assert after < 0.8 * before, (before, after, result.losses)
    assert torch.equal(next(model.frozen("vae").parameters()), vae_before)


@pytest.mark.gpu
def test_both_stages_step_on_cuda_in_bf16(tiny_sdxl, tiny_clip, batch, tmp_path):
    """Accelerate moves the module to the GPU; the frozen models must follow it."""
    torch.manual_seed(0)
    encoder = FaceCLIPEncoder.build(encoder_config(tiny_sdxl))
    encoder.save_pretrained(tmp_path / "align")
    models = [
        AlignmentModel(encoder, load_image_model(str(tiny_clip))),
        FaceCLIPSDXL.build(str(tiny_sdxl), tmp_path / "align"),
    ]
    for i, model in enumerate(models):
        config = TrainConfig(
            output_dir=str(tmp_path / f"run{i}"), max_steps=2, mixed_precision="bf16"
        )
        result = train(model, lambda m, b: m(b), lambda start: itertools.repeat(batch), config)
        assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
