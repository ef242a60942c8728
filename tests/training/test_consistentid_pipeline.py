"""ConsistentID inference from exported weights on references of the real lite build: image size,
determinism, and the merge step switching from text + ID to fused facial conditioning."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from training.consistentid.config import ModelOptions
from training.consistentid.model import ConsistentID
from training.consistentid.pipeline import ConsistentIDGenerator
from training.consistentid.prompt import inference_prompt, tokenize
from training.consistentid.train import export
from training.evaluation.protocols import Generator
from training.reference import load_references
from training.regions import region_masks

TINY = ModelOptions(lora_rank=4, id_depth=1, facial_depth=1, dim_head=16)
STEPS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waits can make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(built_dataset):
    ref = load_references(str(built_dataset))[0]
    assert region_masks(ref.label_map).any(axis=(1, 2)).sum() >= 2  # some regions to fuse
    return ref


@pytest.fixture(scope="module")
def generator(tiny_sd15, tmp_path_factory):
    torch.manual_seed(0)
    model = ConsistentID.from_pretrained(str(tiny_sd15), 128, options=TINY)
    with torch.no_grad():  # trained-looking LoRA updates (exported zeros would hide a load bug)
        for name, p in model.adapters.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(std=0.02)
    folder = tmp_path_factory.mktemp("consistentid-export")
    export(model, folder, {"id_dim": 128, "options": TINY.model_dump(), "image_encoder": None})
    assert json.loads((folder / "consistentid.json").read_text())["id_dim"] == 128
    generator = ConsistentIDGenerator.from_pretrained(
        str(tiny_sd15), folder, device="cpu", steps=STEPS, merge_step=2, height=32, width=48
    )
    loaded = generator.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    return generator


def _array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_generates_an_image_of_the_requested_size_deterministically(generator, reference):
    assert isinstance(generator, Generator)
    image = generator.generate(reference, "a person on a beach", seed=1)
    assert image.size == (48, 32) and image.mode == "RGB"
    again = generator.generate(reference, "a person on a beach", seed=1)
    assert np.array_equal(_array(image), _array(again))
    other = generator.generate(reference, "a person on a beach", seed=2)
    assert not np.array_equal(_array(image), _array(other))


def test_the_merge_step_switches_from_text_and_id_to_fused_conditioning(generator, reference):
    prompt = "a person in a red coat"
    conds = generator.conditions(reference, prompt)
    assert not torch.allclose(conds["fused"], conds["text"])
    # The same ID tokens and text; they differ exactly at the fused region words.
    tokenizer = generator.model.frozen.tokenizer
    present = region_masks(reference.label_map).any(axis=(1, 2)).tolist()
    text, kept = inference_prompt(tokenizer, prompt, present=present)
    _, index = tokenize(tokenizer, text, kept)
    differ = (conds["fused"] != conds["text"]).any(-1)[0]
    assert differ.nonzero().flatten().tolist() == sorted(index[index >= 0].tolist())
    # The negative branch is fused at the same words, from blank region images.
    assert conds["negative"].shape == conds["fused"].shape

    images = {m: _array(generator.generate(reference, prompt, 3, merge_step=m)) for m in (0, 2, 4)}
    assert not np.array_equal(images[0], images[2])
    assert not np.array_equal(images[2], images[4])
    assert not np.array_equal(images[0], images[4])

    # Without regions there is nothing to fuse: every merge step gives the text + ID image.
    # (With regions the negative branch is fused too, so that image differs from this one.)
    bare = dataclasses.replace(reference, label_map=np.zeros_like(reference.label_map))
    bare_conds = generator.conditions(bare, prompt)
    assert torch.equal(bare_conds["fused"], bare_conds["text"])
    assert not torch.equal(bare_conds["negative"], conds["negative"])
    text_and_id = _array(generator.generate(bare, prompt, 3, merge_step=0))
    assert np.array_equal(
        _array(generator.generate(bare, prompt, 3, merge_step=STEPS)), text_and_id
    )
