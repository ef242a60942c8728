"""The FaceCLIP encoder on tiny towers: identity injection, outputs, freezing, export, convert."""

from __future__ import annotations

import pytest
import torch

from training.faceclip.config import EncoderConfig, FaceViTConfig
from training.faceclip.convert import read_release
from training.faceclip.encoder import FaceCLIPEncoder
from training.faceclip.face_vit import FaceViT
from training.faceclip.release import export_to_release, release_to_export


@pytest.fixture(scope="module")
def encoder():
    return FaceCLIPEncoder.build(EncoderConfig.tiny()).eval()


def _faces(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_fused_outputs_shapes_and_dependence_on_the_face(encoder):
    with torch.no_grad():
        out = encoder(_faces(3), ["a man", "a woman", "a child"])
        other = encoder(_faces(3, seed=1), ["a man", "a woman", "a child"])
        negative = encoder(_faces(3), ["a man", "a woman", "a child"], [False] * 3)
    assert out.tokens.shape == (3, 77, 96) and out.pooled.shape == (3, 64)
    assert out.joint.shape == (3, 96) and out.identity.shape == (3, FaceViTConfig.tiny().features)
    assert not torch.allclose(out.tokens, other.tokens)
    assert not torch.allclose(out.pooled, other.pooled)  # the injected id changes the text
    # Without identity the face reaches the tokens only through the fuser, never the pooled text.
    again = encoder(_faces(3, seed=1), ["a man", "a woman", "a child"], [False] * 3)
    torch.testing.assert_close(negative.pooled, again.pooled)


def test_only_the_fuser_and_projections_are_trainable(encoder):
    trainable = {n.split(".", 2)[2].split(".")[0] for n, p in encoder.named_parameters()
                 if p.requires_grad}  # fmt: skip
    assert trainable == {
        "logit_scale", "logit_bias", "proj1", "face_patch_proj", "face_pos_proj",
        "text_embed_proj", "text_pos_proj", "fuser",
    }  # fmt: skip
    out = encoder(_faces(2), ["a man", "a woman"])
    out.tokens.sum().backward()
    assert encoder.towers[0].proj1.weight.grad is not None
    assert encoder.towers[0].fuser.encoder.layers[-1].linear1.weight.grad is None
    encoder.zero_grad()


def test_save_and_reload_gives_the_same_outputs(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "enc")
    again = FaceCLIPEncoder.from_pretrained(tmp_path / "enc").eval()
    with torch.no_grad():
        a, b = encoder(_faces(2), ["x", "y"]), again(_faces(2), ["x", "y"])
    torch.testing.assert_close(a.tokens, b.tokens)


def test_convert_to_the_release_and_back(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "enc")
    path = export_to_release(tmp_path / "enc", tmp_path / "face_clip_encoder.pt")
    state = read_release(path)
    assert all(k.startswith(("face_clip_l.", "face_clip_g.")) for k in state)
    release_to_export(path, tmp_path / "back", EncoderConfig.tiny())
    back = FaceCLIPEncoder.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        a, b = encoder(_faces(2), ["x", "y"]), back(_faces(2), ["x", "y"])
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.pooled, b.pooled)


def test_face_vit_follows_the_arcface_torch_layout(tmp_path):
    tiny = FaceViT(FaceViTConfig.tiny()).eval()
    torch.save({f"module.{k}": v for k, v in tiny.state_dict().items()}, tmp_path / "model.pt")
    loaded = FaceViT.load(tmp_path / "model.pt", FaceViTConfig.tiny())
    faces = _faces(2)
    torch.testing.assert_close(tiny(faces).identity, loaded(faces).identity)


def test_fgid_convert_faceclip_writes_the_release_and_refuses_a_stranger_in_one_line(
    encoder, tmp_path, capsys
):
    from flows.cli import app
    from flows.cli_common import run_cli

    encoder.save_pretrained(tmp_path / "enc")
    out = tmp_path / "face_clip_encoder.pt"
    code = run_cli(app, ["convert", "faceclip", "--to-reference", str(tmp_path / "enc"),
                         "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert all(k.startswith(("face_clip_l.", "face_clip_g.")) for k in read_release(out))

    (tmp_path / "photo.pt").write_bytes(b"\x89PNG not a checkpoint")
    capsys.readouterr()
    code = run_cli(app, ["convert", "faceclip", "--from-reference", str(tmp_path / "photo.pt"),
                         "--out", str(tmp_path / "back")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "back").exists()
