"""FaceCLIP encoder on tiny SDXL towers: identity injection, fused shapes, the face ViT layout."""

from __future__ import annotations

import pytest
import torch

from training.faceclip.config import EncoderConfig, FaceViTConfig, FusionConfig
from training.faceclip.encoder import FaceCLIPEncoder
from training.faceclip.face_vit import FaceViT

WIDTHS = (32, 64)  # tiny_sdxl's text_encoder and text_encoder_2 widths (SDXL: 768, 1280)


@pytest.fixture(scope="module")
def encoder(tiny_sdxl):
    torch.manual_seed(0)
    config = EncoderConfig(
        base_model=str(tiny_sdxl), face_vit=FaceViTConfig.tiny(), fusion=FusionConfig.tiny()
    )
    return FaceCLIPEncoder.build(config)


def _faces(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class _Capture:
    """Records a token-embedding layer's output after every earlier hook (the injection)."""

    def __init__(self, embedding):
        self.outputs: list[torch.Tensor] = []
        self.handle = embedding.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.outputs.append(output.detach().clone())


def test_id_token_embedding_is_replaced_in_both_towers(encoder):
    faces = _faces(2)
    # The second caption says "id" too: only the prefix's `id` is the identity slot.
    prompts = ["a man in a park", "an id card on a table"]
    identity = torch.nn.functional.normalize(encoder.face_vit(faces).identity, dim=-1)
    for tower, fusion in zip(encoder.towers, encoder.fusions, strict=True):
        embedding = tower.model.get_input_embeddings()
        capture = _Capture(embedding)
        try:
            encoder(faces, prompts, with_identity=[True, False])
        finally:
            capture.handle.remove()
        seen = capture.outputs[0]
        ids, _, _ = encoder.tokenize(tower, prompts, [True, False])
        tokens = tower.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        assert tokens[:7] == [
            "<|startoftext|>",
            "photo</w>",
            "of</w>",
            "a</w>",
            "id</w>",
            "person</w>",
            ".</w>",
        ]
        position = tokens.index("id</w>")
        plain = embedding(ids)
        expected = fusion.id_proj(identity[0]).detach()
        assert torch.allclose(seen[0, position], expected, atol=1e-6)
        assert not torch.allclose(plain[0, position], expected)
        others = torch.ones(ids.shape[1], dtype=torch.bool)
        others[position] = False
        assert torch.equal(seen[0, others], plain[0, others].detach())
        # No identity: no prefix and no replacement, although this caption contains "id".
        second = tower.tokenizer.convert_ids_to_tokens(ids[1].tolist())
        assert second[1] == "an</w>" and "id</w>" in second
        assert torch.equal(seen[1], plain[1].detach())


def test_fused_outputs_shapes_and_dependence_on_the_face(encoder):
    prompts = ["a woman reading", "a child on a beach", "a man"]
    out = encoder(_faces(3), prompts)
    assert out.tokens.shape == (3, 77, sum(WIDTHS))  # SDXL: (B, 77, 2048)
    assert out.pooled.shape == (3, WIDTHS[1])  # SDXL: (B, 1280) from bigG
    assert out.joint.shape == (3, sum(WIDTHS))
    assert out.identity.shape == (3, FaceViTConfig.tiny().features)
    assert torch.allclose(out.identity.norm(dim=-1), torch.ones(3))
    other = encoder(_faces(3, seed=1), prompts)
    assert not torch.allclose(out.tokens, other.tokens)
    assert not torch.allclose(out.pooled, other.pooled)  # the injected prompt is pooled
    # Deterministic: the frozen parts are in eval mode even while the module trains.
    encoder.train()
    again = encoder(_faces(3), prompts)
    encoder.eval()
    assert torch.allclose(out.tokens, again.tokens, atol=1e-6)


def test_only_fusion_is_trainable_and_gradients_reach_the_identity_projection(encoder):
    names = {name.split(".")[0] for name, _ in encoder.named_parameters()}
    assert names == {"fusions"}
    assert all(not p.requires_grad for p in encoder.face_vit.parameters())
    assert all(not p.requires_grad for t in encoder.towers for p in t.model.parameters())
    encoder.zero_grad()
    out = encoder(_faces(2), ["a man", "a woman"])
    (out.tokens.square().mean() + out.pooled.square().mean()).backward()
    for fusion in encoder.fusions:
        assert fusion.id_proj.weight.grad is not None
        assert fusion.id_proj.weight.grad.abs().sum() > 0
    encoder.zero_grad()


def test_save_and_reload_gives_the_same_outputs(encoder, tmp_path):
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differ from any fresh init
    encoder.save_pretrained(tmp_path)
    again = FaceCLIPEncoder.from_pretrained(tmp_path)
    faces, prompts = _faces(2), ["a man", "a woman"]
    with torch.no_grad():
        a, b = encoder(faces, prompts), again(faces, prompts)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-6)
    assert torch.allclose(a.pooled, b.pooled, atol=1e-6)


def test_face_vit_follows_the_arcface_torch_layout(tmp_path):
    config = FaceViTConfig(depth=2)  # the released width, grid and head; fewer blocks
    with torch.device("meta"):  # shapes only: the released head alone has 85M weights
        model = FaceViT(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embed.proj.weight"] == (768, 3, 9, 9)
    assert shapes["pos_embed"] == (1, 144, 768)
    assert shapes["blocks.1.attn.qkv.weight"] == (2304, 768)
    assert "blocks.1.attn.qkv.bias" not in shapes
    assert shapes["feature.0.weight"] == (768, 144 * 768)
    assert shapes["feature.2.weight"] == (512, 768)
    assert shapes["feature.3.running_var"] == (512,)
    assert shapes["mask_token"] == (1, 1, 768)

    tiny = FaceViT(FaceViTConfig.tiny())
    # A DDP-saved arcface_torch checkpoint carries `module.`; it loads as is.
    torch.save({f"module.{k}": v for k, v in tiny.state_dict().items()}, tmp_path / "model.pt")
    loaded = FaceViT.load(tmp_path / "model.pt", FaceViTConfig.tiny())
    tiny.eval()
    faces = _faces(2)
    out, again = tiny(faces), loaded(faces)
    assert out.patches.shape == (2, 144, 16) and out.identity.shape == (2, 16)
    assert torch.allclose(out.identity, again.identity)
    # Without weights: a warning and a seeded init, the same on every load.
    a = FaceViT.load(None, FaceViTConfig.tiny())
    b = FaceViT.load(None, FaceViTConfig.tiny())
    assert torch.equal(a(faces).identity, b(faces).identity)


def test_device_and_dtype_moves_reach_the_frozen_models(encoder):
    encoder.to(torch.float64)
    try:
        assert encoder.face_vit.pos_embed.dtype == torch.float64
        assert all(t.model.dtype == torch.float64 for t in encoder.towers)
        out = encoder(_faces(1).double(), ["a man"])
        assert out.tokens.dtype == torch.float64
    finally:
        encoder.to(torch.float32)


def test_image_model_loads_the_vision_side_of_a_clip_model(tiny_clip):
    from transformers import CLIPModel

    from training.faceclip.align import load_image_model

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vision = load_image_model(str(tiny_clip))
    clip = CLIPModel.from_pretrained(str(tiny_clip))
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=pixels)
        expected = getattr(expected, "pooler_output", expected)
        assert torch.allclose(vision(pixel_values=pixels).image_embeds, expected, atol=1e-5)
