"""ConsistentID's model on the tiny SD1.5 folder: trainable/frozen split, the localisation loss on
known attention maps, and gradient steps that fit one fixed batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.consistentid.config import LossOptions, ModelOptions
from training.consistentid.loss import localization_loss
from training.consistentid.model import ConsistentID

ID_DIM = 16
TINY = ModelOptions(lora_rank=4, id_depth=1, facial_depth=1, dim_head=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waits can make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_face(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A drawn face (image, CelebAMask-HQ label map): skin, eyes, ears, nose, lips, hair."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    label = np.zeros((size, size), np.uint8)

    def ellipse(cy, cx, ry, rx):
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

    jitter = rng.uniform(-0.03, 0.03, 2)
    label[ellipse(0.3 + jitter[0], 0.5, 0.25, 0.35)] = 17  # hair
    label[ellipse(0.55 + jitter[0], 0.5 + jitter[1], 0.32, 0.25)] = 1
    for cls, cx in ((7, 0.22), (8, 0.78)):
        label[ellipse(0.55, cx + jitter[1], 0.08, 0.04)] = cls
    for cls, cx in ((4, 0.4), (5, 0.6)):
        label[ellipse(0.47 + jitter[0], cx + jitter[1], 0.035, 0.06)] = cls
    label[ellipse(0.6 + jitter[0], 0.5 + jitter[1], 0.07, 0.035)] = 10
    label[ellipse(0.72 + jitter[0], 0.5 + jitter[1], 0.02, 0.08)] = 12
    label[ellipse(0.75 + jitter[0], 0.5 + jitter[1], 0.02, 0.08)] = 13
    palette = rng.integers(0, 256, (19, 3))
    image = palette[label] + rng.integers(-20, 20, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_batch(tokenizer, batch_size=2, resolution=32, clip_size=32, seed=0) -> dict:
    """A batch in training/loader.py's ConsistentID layout, built with the same region and text
    functions the loader uses."""
    from training.consistentid.prompt import encode_training
    from training.regions import (
        clip_preprocess,
        foreground_mask,
        region_images,
        region_masks,
        resize_label_map,
        to_unit_range,
    )

    rows = []
    for i in range(batch_size):
        target, target_label = synthetic_face(64, seed + 2 * i)
        ref, ref_label = synthetic_face(64, seed + 2 * i + 1)
        label = resize_label_map(target_label, resolution)
        present = region_masks(label).reshape(5, -1).any(1)
        _, ids, index = encode_training(
            tokenizer,
            "A person smiling at the camera.",
            "The face is oval, the eyes are brown, the ears are small, the nose is straight, "
            "and the mouth is wide.",
            present.tolist(),
        )
        ref_present = region_masks(ref_label).reshape(5, -1).any(1)
        regions = clip_preprocess(region_images(ref, ref_label), clip_size)
        regions[torch.from_numpy(~ref_present)] = 0
        embedding = np.random.default_rng(seed + i).normal(size=ID_DIM).astype(np.float32)
        rows.append(
            {
                "pixel_values": to_unit_range(target, resolution),
                "foreground_mask": torch.from_numpy(foreground_mask(label)).float()[None],
                "region_masks": torch.from_numpy(region_masks(label)).float(),
                "region_present": torch.from_numpy(present),
                "input_ids": ids,
                "region_token_index": index,
                "ref_face_pixel_values": clip_preprocess(ref, clip_size),
                "ref_region_pixel_values": regions,
                "ref_region_present": torch.from_numpy(ref_present),
                "ref_id_embeds": torch.from_numpy(embedding / np.linalg.norm(embedding)),
            }
        )
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def model(tiny_sd15):
    torch.manual_seed(0)
    return ConsistentID.from_pretrained(str(tiny_sd15), ID_DIM, options=TINY)


def test_trainable_and_frozen_parameters(model):
    frozen = model.frozen
    trainable = {id(p) for p in model.parameters()}
    assert all(p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {
        "id_projection",
        "facial_encoder",
        "adapters",
    }
    # Inside the UNet only the installed processors train, and they are the model's adapters.
    unet_trainable = {id(p) for p in frozen.unet.parameters() if p.requires_grad}
    assert unet_trainable == {id(p) for p in model.adapters.parameters()} <= trainable
    for module in (frozen.vae, frozen.text_encoder, frozen.image_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    # Every attention of the UNet got a processor: LoRA on self-, LoRA + ID keys on cross-attention.
    kinds = {type(p).__name__ for p in frozen.unet.attn_processors.values()}
    assert kinds == {"LoRAAttnProcessor", "IDAttnProcessor"}
    assert len(model.adapters) == len(frozen.unet.attn_processors)

    # `<|facial|>` got a frozen row, the vocabulary's mean.
    table = frozen.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == len(frozen.tokenizer)
    assert torch.allclose(table[-1], table[:-1].mean(0), atol=1e-6)

    # The tiny CLIP projects 32 -> 32 like both perceivers' input layers: both start from it.
    projection = frozen.image_encoder.visual_projection.weight
    assert model.initialised_from_clip == [
        "id_projection.resampler.proj_in",
        "facial_encoder.resampler.proj_in",
    ]
    assert torch.equal(model.facial_encoder.resampler.proj_in.weight, projection)


def test_a_step_reaches_every_trainable_parameter_and_no_frozen_one(model):
    batch = make_batch(model.frozen.tokenizer)
    assert (batch["region_token_index"] >= 0).all()  # all five regions are drawn and mentioned
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss, logs = model(batch)
    loss.backward()
    assert set(logs) == {"noise_mse", "localization"}
    assert all(p.grad is not None for p in model.parameters())
    for module in model.frozen.modules():
        assert all(p.grad is None for p in module.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_localization_maps_come_from_cross_attention_of_the_chosen_blocks(model):
    assert model.localization_blocks == ["down_blocks.1", "mid_block", "up_blocks.0"]
    batch = make_batch(model.frozen.tokenizer)
    index = batch["region_token_index"]
    model.store.start(index)
    try:
        with torch.no_grad():
            cond = model.condition(
                batch["input_ids"],
                index,
                batch["ref_face_pixel_values"],
                batch["ref_region_pixel_values"],
                batch["ref_region_present"],
                batch["ref_id_embeds"],
            )
            model.frozen.unet(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), cond)
    finally:
        maps = model.store.stop()
    # tiny UNet: one attention in down_blocks.1 and mid_block, two in up_blocks.0; 16x16 latents
    # become 8x8 after the one downsampling block.
    assert [tuple(m.shape) for m in maps] == [(2, 8, 64, 5)] * 4
    assert all(((m >= 0) & (m <= 1)).all() for m in maps)
    assert model.store.token_index is None  # stopped: inference records nothing


def _maps(masks: torch.Tensor, where: str) -> torch.Tensor:
    """(1, heads=2, N, K) attention that is uniform inside, outside or over all of each mask."""
    flat = masks.flatten(2).transpose(1, 2)[:, None].expand(1, 2, -1, -1)  # (1, 2, N, K)
    weight = {"inside": flat, "outside": 1 - flat, "uniform": torch.ones_like(flat)}[where]
    return weight / weight.sum(2, keepdim=True) * 0.3  # the token gets 30% of the softmax


def test_localization_loss_prefers_attention_inside_the_masks():
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, :4, :4] = 1  # region 0: top-left quadrant
    masks[0, 1, 4:] = 1  # region 1: bottom half
    valid = torch.tensor([[True, True]])
    hw = (8, 8)
    inside = localization_loss([_maps(masks, "inside")], masks, valid, hw)
    outside = localization_loss([_maps(masks, "outside")], masks, valid, hw)
    uniform = localization_loss([_maps(masks, "uniform")], masks, valid, hw)
    assert inside < uniform < outside
    # Peak-normalised: all inside gives 0 - 1, all outside 1 - 0, uniform 1 - 1.
    assert inside.item() == pytest.approx(-1, abs=5e-3)
    assert outside.item() == pytest.approx(1, abs=5e-3)
    assert uniform.item() == pytest.approx(0, abs=5e-3)
    raw = localization_loss([_maps(masks, "inside")], masks, valid, hw, normalize=False)
    assert raw.item() == pytest.approx(-0.3 / 16 * 0.5 - 0.3 / 32 * 0.5, rel=1e-3)

    # A region without a token is ignored, whatever its map shows.
    mixed = torch.cat([_maps(masks, "inside")[..., :1], _maps(masks, "outside")[..., 1:]], -1)
    only_first = localization_loss([mixed], masks, torch.tensor([[True, False]]), hw)
    assert only_first.item() == pytest.approx(-1, abs=5e-3)
    assert localization_loss([mixed], masks, valid, hw).item() == pytest.approx(0, abs=5e-3)

    # Layers of different resolutions: masks are resampled to each, then layers averaged.
    coarse_maps = _maps(torch.nn.functional.avg_pool2d(masks, 2), "outside")  # 4x4 positions
    coarse = localization_loss([coarse_maps], masks, valid, hw)
    assert coarse > 0.8
    two = localization_loss([_maps(masks, "inside"), coarse_maps], masks, valid, hw)
    assert two.item() == pytest.approx((inside.item() + coarse.item()) / 2, abs=1e-5)


def test_steps_on_one_fixed_batch_lower_the_loss(tiny_sd15):
    torch.manual_seed(0)
    model = ConsistentID.from_pretrained(
        str(tiny_sd15), ID_DIM, options=TINY, loss=LossOptions(condition_drop_prob=0.0)
    )
    batch = make_batch(model.frozen.tokenizer, batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    losses = []
    for _ in range(30):
        torch.manual_seed(123)  # the same noise, timesteps and augmentation every step
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.65 * losses[0], losses


def test_bf16_frozen_models_with_fp32_trainable_parts(tiny_sd15):
    """The production setting: frozen models held in bf16, trainable parts in fp32, autocast."""
    model = ConsistentID.from_pretrained(
        str(tiny_sd15), ID_DIM, options=TINY, frozen_dtype=torch.bfloat16
    )
    frozen = [p for m in model.frozen.modules() for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    batch = make_batch(model.frozen.tokenizer)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters())
