"""The released ConsistentID format: key-and-shape manifests both ways, round trips, safe file
reading, and our modules against a hand-written re-computation of the reference's equations."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from tests.training import consistentid_sdxl_release as sdxl
from tests.training.consistentid_release import MANIFEST, PROCESSORS
from tests.training.test_consistentid_model import ID_DIM, TINY, make_batch
from training.consistentid.config import ModelOptions
from training.consistentid.convert import (
    from_reference,
    processor_order,
    release_shape,
    release_variant,
    sd15_processors,
    sdxl_processors,
    skeleton,
    to_reference,
)
from training.consistentid.model import ConsistentID
from training.consistentid.release import load_release, load_release_into
from training.state_dicts import check_state
from training.text import facial_token_id

pytestmark = pytest.mark.usefixtures("one_thread")


def released_meta(manifest: dict = MANIFEST) -> dict:
    """A released checkpoint's layout as meta tensors (shapes, no memory)."""
    return {
        g: {k: torch.empty(s, device="meta") for k, s in m.items()} for g, m in manifest.items()
    }


def shapes(release: dict) -> dict:
    return {g: {k: tuple(v.shape) for k, v in release[g].items()} for g in release}


def test_the_released_layout_loads_strictly_into_ours_and_converts_back_exactly():
    assert sd15_processors() == list(PROCESSORS)
    assert sorted(PROCESSORS, key=processor_order) == list(PROCESSORS)
    release = released_meta()
    ours = from_reference(release)
    shape = release_shape(release)
    assert (shape.id_dim, shape.clip_dim, shape.width) == (512, 1280, 768)
    # The defaults are the release's sizes (facial_dim None = ViT-H/14's projection width, 1024).
    assert shape.options == ModelOptions(facial_dim=1024)
    module = skeleton(shape)
    module.load_state_dict(ours, strict=True)
    back = to_reference(module.state_dict())
    assert shapes(back) == MANIFEST


SD15_HIDDEN = {"down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280, "mid_block": 1280}
SD15_HIDDEN |= {"up_blocks.1": 1280, "up_blocks.2": 640, "up_blocks.3": 320}


def test_the_sdxl_release_layout_is_told_apart_and_converts_back_exactly():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SDXL base's UNet, shapes only
        unet = UNet2DConditionModel(**sdxl.UNET_CONFIG)
    names = [name.removesuffix(".processor") for name in unet.attn_processors]
    assert sdxl_processors() == names and len(names) == 140
    for name in names:  # the manifest's widths are the UNet's
        attn, hidden = unet.get_submodule(name), sdxl.HIDDEN[name.split(".attentions")[0]]
        context = sdxl.CROSS_ATTENTION_DIM if name.endswith("attn2") else hidden
        assert (attn.to_q.out_features, attn.to_k.in_features) == (hidden, context), name
    # The adapter key rule gives the SD 1.5 release's keys and shapes, as listed one by one.
    assert sdxl.adapter_modules(list(PROCESSORS), SD15_HIDDEN, 768) == MANIFEST["adapter_modules"]

    manifest = {
        "image_proj": sdxl.IMAGE_PROJ,
        "adapter_modules": sdxl.adapter_modules(names, sdxl.HIDDEN, sdxl.CROSS_ATTENTION_DIM),
        "FacialEncoder": sdxl.FACIAL_ENCODER,
    }
    release = released_meta(manifest)
    release["image_proj_model"] = release.pop("image_proj")  # the SDXL pipeline's group name
    assert release_variant(release) == "sdxl" and release_variant(released_meta()) == "sd15"
    shape = release_shape(release)
    assert (shape.id_dim, shape.clip_dim, shape.width) == (512, 1280, 2048)
    assert shape.options == ModelOptions(facial_dim=1024)
    assert [p[0] for p in shape.processors] == names
    module = skeleton(shape)
    module.load_state_dict(from_reference(release), strict=True)
    assert shapes(to_reference(module.state_dict())) == manifest
    with pytest.raises(ValueError, match="140 attention processors, the UNet has 32"):
        from_reference(release, sd15_processors())
    del (
        release["adapter_modules"]["139.to_v_ip.weight"],
        release["adapter_modules"]["139.to_k_ip.weight"],
    )
    for key in [k for k in release["adapter_modules"] if k.startswith("139.")]:
        del release["adapter_modules"][key]
    with pytest.raises(ValueError, match="139 attention processors, no released UNet"):
        from_reference(release)


def tiny_model(tiny_sd15, **options) -> ConsistentID:
    torch.manual_seed(0)
    model = ConsistentID.from_pretrained(
        str(tiny_sd15), ID_DIM, options=TINY.model_copy(update=options)
    )
    with torch.no_grad():  # LoRA ups start at zero: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model(tiny_sd15):
    return tiny_model(tiny_sd15)


def test_round_trip_is_exact_and_strict(model):
    state = model.state_dict()
    release = to_reference(state)
    assert set(release) == {"image_proj", "adapter_modules", "FacialEncoder"}
    assert len(release["adapter_modules"]) == 8 * 4 + 10 * 4  # tiny UNet: 4 self-, 4 cross-attn
    back = from_reference(release, model.processor_names())
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    model.load_state_dict(back, strict=True)


def test_tensors_beyond_the_release_are_refused(tiny_sd15):
    aligned = tiny_model(tiny_sd15, facial_align=True)
    with pytest.raises(ValueError, match=r"lacks: facial_encoder\.align\..*facial_encoder\.slot"):
        to_reference(aligned.state_dict())


def test_wrong_keys_are_named_in_one_line(model):
    release = to_reference(model.state_dict())
    with pytest.raises(ValueError, match=r"missing \['FacialEncoder'\], unexpected \['extra'\]"):
        from_reference({"image_proj": {}, "adapter_modules": {}, "extra": {}})
    release["FacialEncoder"]["fuse_module.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="FacialEncoder.fuse_module.bogus.weight"):
        from_reference(release, model.processor_names())
    state = model.state_dict()
    broken = {k: v for k, v in state.items() if "norm_out" not in k}
    broken["id_projection.mlp.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as error:
        check_state(state, broken)
    message = str(error.value)
    assert "\n" not in message and "missing: facial_encoder.resampler.norm_out.bias" in message
    assert "shape: id_projection.mlp.0.weight (3, 3) != (32, 16)" in message


def test_release_files_load_safely(model, tmp_path):
    release = to_reference(model.state_dict())
    torch.save(release, tmp_path / "release.bin")
    load_release_into(model, tmp_path / "release.bin")  # torch file, strict
    flat = {f"{g}.{k}": v.contiguous() for g, part in release.items() for k, v in part.items()}
    from safetensors.torch import save_file

    save_file(flat, str(tmp_path / "release.safetensors"))
    again = load_release(tmp_path / "release.safetensors")
    assert all(torch.equal(again[g][k], release[g][k]) for g in release for k in release[g])

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ValueError, match="not a torch checkpoint that loads safely"):
        load_release(tmp_path / "evil.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_release(tmp_path / "junk.safetensors")
    torch.save({"image_proj": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="groups missing"):
        load_release_into(model, tmp_path / "partial.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


# -- the reference's equations, written out by hand over the released key names ----------------


def _ln(sd, p, x):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])


def _heads(x, heads):
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def ref_perceiver(sd, p, latents, features, dim_head):
    """FacePerceiverResampler / AttentionMLP: q and k each scaled by dim_head**-0.25."""
    x = features @ sd[f"{p}proj_in.weight"].T + sd[f"{p}proj_in.bias"]
    i = 0
    while f"{p}layers.{i}.0.to_q.weight" in sd:
        a, f = f"{p}layers.{i}.0.", f"{p}layers.{i}.1."
        xn, ln = _ln(sd, a + "norm1", x), _ln(sd, a + "norm2", latents)
        heads = sd[a + "to_q.weight"].shape[0] // dim_head
        q = _heads(ln @ sd[a + "to_q.weight"].T, heads)
        k, v = (torch.cat([xn, ln], 1) @ sd[a + "to_kv.weight"].T).chunk(2, -1)
        k, v = _heads(k, heads), _heads(v, heads)
        scale = dim_head**-0.25
        w = torch.softmax((q * scale) @ (k * scale).transpose(-1, -2), -1)
        out = (w @ v).transpose(1, 2).flatten(2)
        latents = latents + out @ sd[a + "to_out.weight"].T
        h = F.gelu(_ln(sd, f + "0", latents) @ sd[f + "1.weight"].T) @ sd[f + "3.weight"].T
        latents = latents + h
        i += 1
    latents = latents @ sd[f"{p}proj_out.weight"].T + sd[f"{p}proj_out.bias"]
    return _ln(sd, f"{p}norm_out", latents)


def _linear(sd, p, x):
    return x @ sd[p + ".weight"].T + sd[p + ".bias"]


def ref_id_tokens(sd, id_embeds, patches, num_tokens, dim_head):
    x = _linear(sd, "proj.2", F.gelu(_linear(sd, "proj.0", id_embeds)))
    x = _ln(sd, "norm", x.reshape(-1, num_tokens, sd["norm.weight"].shape[0]))
    return ref_perceiver(sd, "perceiver_resampler.", x, patches, dim_head)


def _mlp(sd, p, x, residual):
    out = _linear(sd, p + ".fc2", F.gelu(_linear(sd, p + ".fc1", _ln(sd, p + ".layernorm", x))))
    return out + x if residual else out


def ref_facial(sd, prompt_embeds, images, token_mask, valid, dim_head):
    """FacialEncoder: one token per image; the k-th marked position takes the k-th valid image."""
    b, n = images.shape[:2]
    latents = sd["visual_projection.latents"].repeat(b * n, 1, 1)
    tokens = ref_perceiver(sd, "visual_projection.", latents, images.flatten(0, 1), dim_head)
    tokens = tokens.view(b, n, -1)[valid]
    flat = prompt_embeds.reshape(-1, prompt_embeds.shape[-1]).clone()
    at = flat[token_mask.flatten()]
    fused = _mlp(sd, "fuse_module.mlp1", torch.cat([at, tokens], -1), False) + at
    fused = _ln(sd, "fuse_module.layer_norm", _mlp(sd, "fuse_module.mlp2", fused, True))
    flat[token_mask.flatten()] = fused
    return flat.view_as(prompt_embeds)


def ref_ip_attention(sd, i, attn, hidden, context, num_tokens):
    """Consistent_IPAttProcessor: LoRA on q, k, v, out; ID tokens through to_k_ip / to_v_ip."""

    def lora(name, x):
        return x @ sd[f"{i}.{name}.down.weight"].T @ sd[f"{i}.{name}.up.weight"].T

    text, ids = context[:, :-num_tokens], context[:, -num_tokens:]
    q = attn.to_q(hidden) + lora("to_q_lora", hidden)
    k = attn.to_k(text) + lora("to_k_lora", text)
    v = attn.to_v(text) + lora("to_v_lora", text)
    h = attn.heads

    def attend(q, k, v):
        q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
        w = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        return (w @ v).transpose(1, 2).flatten(2)

    out = attend(q, k, v)
    out = out + attend(q, ids @ sd[f"{i}.to_k_ip.weight"].T, ids @ sd[f"{i}.to_v_ip.weight"].T)
    return attn.to_out[0](out) + lora("to_out_lora", out)


def test_our_modules_compute_the_reference_equations(model):
    torch.manual_seed(1)
    release = to_reference(model.state_dict())
    dim_head, tokens = TINY.dim_head, TINY.num_id_tokens
    ids, patches = (
        torch.randn(2, ID_DIM),
        torch.randn(2, 7, model.frozen.image_encoder.config.hidden_size),
    )
    with torch.no_grad():
        ours = model.id_projection(ids, patches)
        theirs = ref_id_tokens(release["image_proj"], ids, patches, tokens, dim_head)
        assert torch.allclose(ours, theirs, atol=1e-5)

        unet = model.frozen.unet
        names = sorted(model.processor_names(), key=processor_order)
        cross = next(n for n in names if n.endswith("attn2"))
        attn = unet.get_submodule(cross)
        hidden = torch.randn(2, 6, attn.to_q.in_features)
        context = torch.randn(2, 9 + tokens, attn.to_k.in_features)
        ours = attn.processor(attn, hidden, context)
        theirs = ref_ip_attention(
            release["adapter_modules"], names.index(cross), attn, hidden, context, tokens
        )
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_prompt_embeddings_equal_the_reference_fusion(model):
    """The region word's hidden state replaced, markers gone: text encoder + FacialEncoder."""
    batch = make_batch(model.frozen.tokenizer, seed=3)
    present = torch.tensor([[True, True, False, True, True], [True] * 5])
    from training.consistentid import prompt

    tokenizer = model.frozen.tokenizer
    facial = "The face is oval, the eyes are brown, the ears are small, the nose is straight."
    rows = [prompt.encode_training(tokenizer, "A person.", facial, p.tolist()) for p in present]
    input_ids = torch.stack([r[1] for r in rows])
    index = torch.stack([r[2] for r in rows])
    assert (input_ids != facial_token_id(tokenizer)).all()
    regions = batch["ref_region_pixel_values"]
    with torch.no_grad():
        ours = model.condition(
            input_ids,
            index,
            batch["ref_face_pixel_values"],
            regions,
            present,
            batch["ref_id_embeds"],
        )
        # The reference's inputs: marked positions from the text by hand, region images
        # compacted in region order (the valid ones first, then zero padding).
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        images = torch.zeros(2, 5, *model.clip_patches(regions[:, 0]).shape[1:])
        valid = torch.zeros(2, 5, dtype=torch.bool)
        for b, (text, _, _) in enumerate(rows):
            pieces = tokenizer(text).input_ids
            clean = 0
            for token in pieces:
                if token == facial_token_id(tokenizer):
                    mask[b, clean - 1] = True
                else:
                    clean += 1
            kept = [r for r in range(5) if index[b, r] >= 0]
            for k, r in enumerate(kept):
                images[b, k] = model.clip_patches(regions[b, r : r + 1])[0]
            valid[b, : len(kept)] = True
        text = model.frozen.text_encoder(input_ids)[0]
        theirs = ref_facial(release_of(model), text, images, mask, valid, TINY.dim_head)
    # Row 0 lacks ears, the description lacks the mouth: 3 and 4 fused words.
    assert mask.sum() == (index >= 0).sum() == 3 + 4
    assert torch.allclose(ours[:, :77], theirs, atol=1e-5)
    assert not torch.allclose(theirs, text, atol=1e-3)


def release_of(model):
    return to_reference(model.state_dict())["FacialEncoder"]
