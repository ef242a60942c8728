"""The released FaceCLIP encoder: key-and-shape manifest both ways, strict loads, and outputs
equal to the reference modules' and to independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.training import faceclip_release as release
from training.faceclip.config import EncoderConfig, FaceViTConfig, FuserConfig, TowerConfig
from training.faceclip.convert import (
    from_reference,
    load_reference,
    read_release,
    to_reference,
)
from training.faceclip.deform_attn import MultiScaleDeformableAttention, reference_points
from training.faceclip.encoder import FaceCLIPEncoder
from training.faceclip.fuser import BiAttention
from training.state_dicts import check_state


@pytest.fixture(scope="module")
def released_size():
    """Our encoder at the released configs, without memory (meta tensors)."""
    with torch.device("meta"):
        return FaceCLIPEncoder(EncoderConfig())


def _meta_release() -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in release.MANIFEST.items()}


def test_to_reference_gives_exactly_the_released_keys_and_shapes(released_size):
    ours = to_reference(released_size.state_dict())
    assert len(release.MANIFEST) == 1686
    assert {k: tuple(v.shape) for k, v in ours.items()} == release.MANIFEST


def test_from_reference_fits_our_encoder_strictly(released_size):
    state = from_reference(_meta_release())
    check_state(released_size.state_dict(), state)
    assert set(to_reference(state)) == set(release.MANIFEST)


def test_the_loaders_model_prefix_is_accepted_and_foreign_keys_are_refused(released_size):
    prefixed = {f"model.{k}": v for k, v in _meta_release().items()}
    check_state(released_size.state_dict(), from_reference(prefixed))
    with pytest.raises(ValueError, match="not a key"):
        from_reference({"unet.conv_in.weight": torch.zeros(1)})
    partial = from_reference(_meta_release())
    partial.pop("towers.1.fuser.encoder.layers.5.norm2.bias")
    with pytest.raises(ValueError, match="1 missing"):
        check_state(released_size.state_dict(), partial)


def _small_release_encoder() -> tuple[FaceCLIPEncoder, dict[str, torch.Tensor]]:
    """Our encoder at the recorded small size, with the recorded weights."""
    config = EncoderConfig(
        towers=[TowerConfig.tiny(32), TowerConfig.tiny(64)],
        face_vit=FaceViTConfig.tiny(),
        fuser=FuserConfig(),  # the released fuser settings
    )
    encoder = FaceCLIPEncoder(config).eval()
    spec = {k: (tuple(v.shape), v.dtype) for k, v in to_reference(encoder.state_dict()).items()}
    state = release.fill_state(spec)
    load_reference(encoder, state)
    return encoder, state


def test_fused_tokens_and_pooled_output_equal_the_reference_modules():
    encoder, _ = _small_release_encoder()
    faces, prompts, with_identity = release.fixture_inputs()
    with torch.no_grad():
        out = encoder(faces * 2 - 1, prompts, with_identity.tolist())  # ours take [-1, 1]
    assert out.tokens.shape == (2, 77, 96) and out.pooled.shape == (2, 64)
    for (b, t), values in release.FUSED_AT.items():
        got = out.tokens[b, t, list(release.CHANNELS)]
        torch.testing.assert_close(got, torch.tensor(values), atol=2e-5, rtol=1e-5)
    sums = out.tokens.abs().sum(dim=(1, 2))
    torch.testing.assert_close(sums, torch.tensor(release.FUSED_ABS_SUM), atol=0.02, rtol=1e-5)
    torch.testing.assert_close(out.pooled[:, :8], torch.tensor(release.POOLED_HEAD), atol=2e-5,
                               rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(out.pooled.abs().sum(-1), torch.tensor(release.POOLED_ABS_SUM),
                               atol=2e-3, rtol=1e-5)  # fmt: skip


def test_a_release_file_round_trips(tmp_path):
    encoder, state = _small_release_encoder()
    path = tmp_path / "face_clip_encoder.pt"
    torch.save({f"model.{k}": v for k, v in to_reference(encoder.state_dict()).items()}, path)
    loaded = read_release(path)
    assert {k.removeprefix("model."): v for k, v in loaded.items()}.keys() == state.keys()
    again, _ = _small_release_encoder()
    load_reference(again, path)
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="loads safely"):
        read_release(tmp_path / "bad.pt")


def _bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value (C, H, W) at pixel coordinates (x, y), centres at integers, zeros outside."""
    c, h, w = value.shape
    x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
    out = torch.zeros(c, dtype=value.dtype)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * value[:, yy, xx]
    return out


def test_deformable_attention_equals_explicit_bilinear_sampling():
    torch.manual_seed(0)
    dim, heads, points, grid = 8, 2, 3, (3, 4)
    attn = MultiScaleDeformableAttention(dim, heads, 1, points).double()
    for p in attn.parameters():  # away from the init, so offsets and weights matter
        torch.nn.init.normal_(p, std=0.5)
    attn.requires_grad_(False)
    query = torch.randn(1, 12, dim, dtype=torch.float64)
    value = torch.randn(1, 12, dim, dtype=torch.float64)
    ref = reference_points([grid]).double()
    got = attn(query, value, ref, [grid])[0]

    h, w = grid
    d = dim // heads
    v = attn.value_proj(value)[0].view(h, w, heads, d).permute(2, 3, 0, 1)  # heads, d, h, w
    offsets = attn.sampling_offsets(query)[0].view(12, heads, points, 2)
    weights = attn.attention_weights(query)[0].view(12, heads, points).softmax(-1)
    expected = torch.zeros(12, dim, dtype=torch.float64)
    for q in range(12):
        for m in range(heads):
            for k in range(points):
                # normalised location -> pixel coordinates with centres at integers
                x = (ref[q, 0, 0] + offsets[q, m, k, 0] / w) * w - 0.5
                y = (ref[q, 0, 1] + offsets[q, m, k, 1] / h) * h - 0.5
                sample = _bilinear(v[m], float(x), float(y))
                expected[q, m * d : (m + 1) * d] += weights[q, m, k] * sample
    torch.testing.assert_close(got, attn.output_proj(expected))


def test_bi_attention_equals_two_softmaxes_of_one_logit_matrix():
    torch.manual_seed(0)
    attn = BiAttention(dim=6, embed_dim=8, heads=2, dropout=0.0).double().eval()
    attn.requires_grad_(False)
    v, t = torch.randn(1, 5, 6).double(), torch.randn(1, 4, 6).double()
    dv, dl = attn(v, t)
    q, k = attn.v_proj(v)[0], attn.l_proj(t)[0]
    vv, vl = attn.values_v_proj(v)[0], attn.values_l_proj(t)[0]
    outs_v, outs_l = [], []
    for m in range(2):
        s = slice(4 * m, 4 * m + 4)
        logits = q[:, s] @ k[:, s].T / 2.0  # head width 4
        outs_v.append(F.softmax(logits, -1) @ vl[:, s])
        outs_l.append(F.softmax(logits.T, -1) @ vv[:, s])
    torch.testing.assert_close(dv[0], attn.out_v_proj(torch.cat(outs_v, -1)))
    torch.testing.assert_close(dl[0], attn.out_l_proj(torch.cat(outs_l, -1)))


def test_the_identity_enters_only_the_id_word_of_the_prefix():
    encoder, _ = _small_release_encoder()
    ids, mask = encoder.tokenize(["an id card photo", "an id card photo"], [True, False])
    assert mask[0].sum() == 1 and mask[1].sum() == 0
    assert ids[0, mask[0]].item() == encoder.id_token
    assert int(mask[0].nonzero()) == 4  # <start> photo of a id
