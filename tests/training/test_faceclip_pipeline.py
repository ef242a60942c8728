"""FaceCLIPGenerator on tiny SDXL: size, determinism, the zero-face negative, weight folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from training.evaluation.protocols import Generator
from training.faceclip.config import EncoderConfig
from training.faceclip.encoder import FaceCLIPEncoder
from training.faceclip.pipeline import FaceCLIPGenerator
from training.faceclip.sdxl import FaceCLIPSDXL
from training.reference import load_references

SETTINGS = dict(steps=2, height=48, width=32, device="cpu")


@pytest.fixture(scope="module")
def export(tiny_sdxl, tmp_path_factory):
    """A FaceCLIP-SDXL export (final/ layout) with trained-looking, non-initial weights."""
    root = tmp_path_factory.mktemp("faceclip-export")
    torch.manual_seed(0)
    config = EncoderConfig.tiny()
    encoder = FaceCLIPEncoder.build(config)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the cross-attention gains start near zero
    encoder.save_pretrained(root / "align" / "encoder")
    model = FaceCLIPSDXL.build(str(tiny_sdxl), root / "align")
    model.save_pretrained(root / "final")
    return root


@pytest.fixture(scope="module")
def references(built_dataset):
    refs = load_references(str(built_dataset), identities=2)
    assert len(refs) == 2
    return refs


@pytest.fixture(scope="module")
def generator(tiny_sdxl, export):
    return FaceCLIPGenerator.from_pretrained(str(tiny_sdxl), export / "final", **SETTINGS)


def test_generates_the_requested_size_deterministically(generator, references):
    assert isinstance(generator, Generator)
    image = generator.generate(references[0], "a person in a park", seed=7)
    assert image.size == (32, 48)  # PIL: (width, height)
    again = generator.generate(references[0], "a person in a park", seed=7)
    assert np.array_equal(np.asarray(image), np.asarray(again))
    other = generator.generate(references[1], "a person in a park", seed=7)
    assert not np.array_equal(np.asarray(image), np.asarray(other))


def test_default_size_is_the_released_one(tiny_sdxl, export):
    generator = FaceCLIPGenerator.from_pretrained(str(tiny_sdxl), export / "final", device="cpu")
    assert (generator.height, generator.width) == (1152, 864)


def test_zero_face_negative_differs_from_the_positive(generator, references):
    cond = generator.conditions(references[0], "a person in a park")
    positive, negative = cond["positive"], cond["negative"]
    assert positive.tokens.shape == negative.tokens.shape == (1, 77, 96)
    assert not torch.allclose(positive.tokens, negative.tokens)
    assert not torch.allclose(positive.pooled, negative.pooled)
    # The negative is the zero face with the empty prompt and no identity, whatever the reference.
    other = generator.conditions(references[1], "a person in a park")["negative"]
    assert torch.equal(negative.tokens, other.tokens)
    # The face itself moves the positive, not only the prompt prefix.
    encoder = generator.encoder
    face = torch.zeros(1, 3, 112, 112)
    with torch.no_grad():
        zero_face = encoder(face, ["a person in a park"], with_identity=[True])
    assert not torch.allclose(positive.tokens, zero_face.tokens)


def test_loads_from_a_checkpoint_folder(tiny_sdxl, export, references, tmp_path):
    """A `checkpoint-{step}` folder holds Accelerate's model.safetensors; its run folder says
    where the encoder is."""
    model = FaceCLIPSDXL.build(str(tiny_sdxl), export / "align")
    with torch.no_grad():
        for p in model.unet.parameters():
            p.mul_(1.1)
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint / "model.safetensors"
    )
    run = {"stage": "sdxl", "encoder_weights": str(export / "align"), "encoder": None}
    (tmp_path / "faceclip.json").write_text(json.dumps(run))
    generator = FaceCLIPGenerator.from_pretrained(str(tiny_sdxl), checkpoint, **SETTINGS)
    loaded = generator.pipeline.unet.state_dict()
    for name, value in model.unet.state_dict().items():
        assert torch.equal(loaded[name], value)
    image = generator.generate(references[0], "a person", seed=1)
    assert image.size == (32, 48)


def test_bfloat16_generation(tiny_sdxl, export, references):
    generator = FaceCLIPGenerator.from_pretrained(
        str(tiny_sdxl), export / "final", **(SETTINGS | {"dtype": "bfloat16", "steps": 1})
    )
    assert generator.pipeline.unet.dtype == generator.encoder.face_vit.pos_embed.dtype
    assert generator.pipeline.unet.dtype == torch.bfloat16
    assert generator.generate(references[0], "a person", seed=0).size == (32, 48)
