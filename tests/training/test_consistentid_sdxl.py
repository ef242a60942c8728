"""ConsistentID-SDXL on a tiny SDXL: a model saved in the released layout is evaluated from that
file (weights loaded strictly, images scored), and its prompt embeddings are the reference
SDXL pipeline's, recomputed here by hand from the released key names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.training import tiny_models
from tests.training.test_consistentid_convert import _linear, _ln, ref_facial, ref_perceiver
from tests.training.test_evaluate import _config, metric_models  # noqa: F401 - a fixture
from training.consistentid.convert import to_reference
from training.text import FACIAL_TOKEN, facial_token_id

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = {"device": "cpu", "steps": 2, "merge_step": 1, "height": 32, "width": 32}
RELEASE_DIM_HEAD = 64  # the release's perceiver heads, which its shapes do not record


@pytest.fixture(scope="module")
def released(tiny_sdxl, built_dataset, metric_models, tmp_path_factory):  # noqa: F811
    """A tiny ConsistentID-SDXL written as the released dict and evaluated from that file:
    (model, generator, result)."""
    from training.consistentid.config import ModelOptions
    from training.consistentid.sdxl import ConsistentIDXL
    from training.evaluation.config import load_generator
    from training.evaluation.run import run_evaluation

    folder = tmp_path_factory.mktemp("released-sdxl")
    clip = tiny_models.save_clip_image_encoder(folder / "clip")
    torch.manual_seed(0)
    options = ModelOptions(lora_rank=4, id_depth=1, facial_depth=1)
    model = ConsistentIDXL.from_pretrained(str(tiny_sdxl), 128, str(clip), options)
    with torch.no_grad():  # LoRA ups start at zero: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    weights = folder / "ConsistentID_SDXL-v1.bin"
    torch.save(to_reference(model.state_dict()), weights)
    config = _config(
        built_dataset, folder / "eval-cid-sdxl", kind="consistentid", base_model=str(tiny_sdxl),
        weights=str(weights), options={**SAMPLING, "image_encoder": str(clip)},
    )  # fmt: skip
    generator = load_generator(config.generator)
    return model.eval(), generator, run_evaluation(config, generator, metric_models)


def test_the_released_sdxl_file_loads_strictly_and_is_evaluated(released):
    from training.consistentid.sdxl import ConsistentIDXLGenerator

    model, generator, result = released
    assert isinstance(generator, ConsistentIDXLGenerator)
    assert generator.name == "consistentid-sdxl-release"
    expected, loaded = model.state_dict(), generator.model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert result.generated == 4 and result.reused == 0
    assert {r["generator"] for r in result.per_image} == {"consistentid-sdxl-release"}
    assert [(s["category"], s["images"]) for s in result.summary][0] == ("all", 4)


def _states(frozen, ids, ids_2):
    """Both encoders' `hidden_states[-2]` side by side, and the second's projected pooled."""
    first = frozen.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    second = frozen.text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([first, second.hidden_states[-2]], -1), second.text_embeds


def test_prompt_embeddings_are_the_sdxl_pipelines(released, built_dataset):
    from training.consistentid.pipeline import reference_inputs
    from training.consistentid.sdxl import fused_text
    from training.reference import load_references

    model, generator, _ = released
    frozen = model.frozen
    tokenizer, tokenizer_2 = frozen.tokenizer, frozen.tokenizer_2
    reference = load_references(str(built_dataset))[0]
    prompt = "a man in a park"
    ref = reference_inputs(frozen, reference)
    present = ref["present"][0].tolist()
    assert sum(present) >= 2
    text, *_ = fused_text(tokenizer, tokenizer_2, prompt, present)
    assert text.startswith(f"{prompt}; Detail:") and FACIAL_TOKEN in text
    release = to_reference(model.state_dict())
    with torch.no_grad():
        conds = generator.conditions(reference, prompt)
        # By hand, as the reference does: markers out of the first tokenization (the word
        # before each is fused), spelled out as plain text in the second's ("!" padding).
        marker, ids, mask = facial_token_id(tokenizer), [], torch.zeros(1, 77, dtype=torch.bool)
        for token in tokenizer(text).input_ids:
            if token == marker:
                mask[0, len(ids) - 1] = True
            else:
                ids.append(token)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (77 - len(ids))])
        spelled = tokenizer_2(text).input_ids
        assert len(spelled) <= 77 and tokenizer_2.convert_tokens_to_ids("facial</w>") in spelled
        ids_2 = torch.tensor(
            [spelled + [tokenizer_2.convert_tokens_to_ids("!")] * (77 - len(spelled))]
        )
        states, pooled = _states(frozen, ids, ids_2)
        assert states.shape[-1] == frozen.unet.config.cross_attention_dim

        # Region images compacted in region order, each through CLIP's penultimate layer.
        kept = [r for r in range(5) if present[r]]
        assert mask.sum() == len(kept)  # the description names every region
        images = torch.zeros(1, 5, *model.clip_patches(ref["regions"][:, 0]).shape[1:])
        blank = torch.zeros_like(images)
        for k, r in enumerate(kept):
            images[0, k] = model.clip_patches(ref["regions"][:, r])[0]
            blank[0, k] = model.clip_patches(torch.zeros_like(ref["regions"][:, r]))[0]
        valid = torch.arange(5)[None] < len(kept)
        sd = release["FacialEncoder"]
        fused = ref_facial(sd, states, images, mask, valid, RELEASE_DIM_HEAD)

        # ProjPlusModel with shortcut=True: the unrefined tokens plus the perceiver's.
        proj = release["image_proj"]

        def id_tokens(embedding, face):
            x = _linear(proj, "proj.2", F.gelu(_linear(proj, "proj.0", embedding)))
            x = _ln(proj, "norm", x.reshape(1, 4, -1))
            patches = model.clip_patches(face)
            return x + ref_perceiver(proj, "perceiver_resampler.", x, patches, RELEASE_DIM_HEAD)

        tokens = id_tokens(ref["embedding"], ref["face"])
        negative_tokens = id_tokens(
            torch.zeros_like(ref["embedding"]), torch.zeros_like(ref["face"])
        )

        # The text-only branch: the prompt alone, each tokenizer padding its own way.
        plain = [
            t(prompt, padding="max_length", max_length=77).input_ids
            for t in (tokenizer, tokenizer_2)
        ]
        plain_states, plain_pooled = _states(frozen, *(torch.tensor([p]) for p in plain))

    def close(a, b):
        return torch.allclose(a, b, atol=1e-5)

    assert close(conds["fused"], torch.cat([fused, tokens], 1))
    assert close(conds["pooled"], pooled)
    assert close(conds["text"], torch.cat([plain_states, tokens], 1))
    assert close(conds["text_pooled"], plain_pooled)
    # Exactly the region words' 2048-wide vectors (both encoders' parts) are replaced.
    differ = (conds["fused"][:, :77] != states).any(-1)
    assert torch.equal(differ, mask)
    # No negative prompt: SDXL's zeros, and in the fused steps the blank regions fused there.
    zeros = torch.zeros_like(states)
    assert close(conds["negative"], torch.cat([zeros, negative_tokens], 1))
    negative_fused = ref_facial(sd, zeros, blank, mask, valid, RELEASE_DIM_HEAD)
    assert close(conds["negative_fused"], torch.cat([negative_fused, negative_tokens], 1))
    assert torch.equal(conds["negative_pooled"], torch.zeros_like(pooled))
