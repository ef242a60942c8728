"""The frozen face encoder: a face-recognition ViT on 112x112 aligned faces.

State-dict layout: insightface's `recognition/arcface_torch/backbones/vit.py` (the
`vit_l_dp005_mask_005` backbone, the one FaceCLIP uses), so a released arcface_torch ViT
checkpoint loads with `FaceViT.load(path)` unchanged:

    patch_embed.proj.{weight,bias}        Conv2d(3, width, patch, stride=patch)
    pos_embed                             (1, tokens, width), no class token
    blocks.{i}.norm1 / norm2              LayerNorm(width)
    blocks.{i}.attn.qkv.weight            Linear(width, 3 width), no bias
    blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.mlp.fc1 / fc2              ReLU6 in between
    norm                                  LayerNorm(width)
    feature.0 Linear(tokens*width, width, no bias), feature.1 BatchNorm1d(width, eps 2e-5),
    feature.2 Linear(width, features, no bias), feature.3 BatchNorm1d(features, eps 2e-5)
    mask_token                            (1, 1, width), used only by its patch-masking training

The identity feature (what FaceCLIP calls the face "class token") is the `feature` head's
output; the patch tokens are the 144 normalised token states before it. Inputs are RGB in
[-1, 1] ((x / 255 - 0.5) / 0.5, arcface_torch's normalisation). Patch 9 on 112 pixels covers
108: the last 4 rows and columns are never seen, as in the original.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.faceclip.config import FaceViTConfig

log = logging.getLogger(__name__)


@dataclass
class FaceFeatures:
    identity: torch.Tensor  # (B, features), not normalised
    patches: torch.Tensor  # (B, tokens, width)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FaceViT(nn.Module):
    def __init__(self, config: FaceViTConfig):
        super().__init__()
        self.config = config
        width, tokens = config.width, config.tokens
        self.patch_embed = PatchEmbed(config.patch_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        self.blocks = nn.ModuleList(
            Block(width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(width)
        self.feature = nn.Sequential(
            nn.Linear(tokens * width, width, bias=False),
            nn.BatchNorm1d(width, eps=2e-5),
            nn.Linear(width, config.features, bias=False),
            nn.BatchNorm1d(config.features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, faces: torch.Tensor) -> FaceFeatures:
        size = self.config.image_size
        if faces.shape[-2:] != (size, size):
            faces = F.interpolate(faces, size=(size, size), mode="bilinear", align_corners=False)
        x = self.patch_embed(faces) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        patches = self.norm(x)
        identity = self.feature(patches.flatten(1))
        return FaceFeatures(identity=identity, patches=patches)

    @classmethod
    def load(cls, path: str | Path | None, config: FaceViTConfig, seed: int = 0) -> FaceViT:
        """The frozen encoder in eval mode, from an arcface_torch state dict; without `path`, a
        seeded random init (so two loads agree) that only tests should rely on."""
        if path is None:
            log.warning(
                "no face-encoder weights given: using a randomly initialised face ViT; identity "
                "features are meaningless (fine for tests, never for training a real model)"
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls(config)
        else:
            model = cls(config)
            model.load_state_dict(_read_state_dict(Path(path)))
        return model.eval().requires_grad_(False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    # Checkpoints saved from a DDP-wrapped backbone carry a `module.` prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}
