"""FaceCLIP architecture settings, as the released configs build it: towers, face ViT, fuser."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ID_PROMPT = "Photo of a id person."
ID_WORD = "id"
RUN_FILE = "faceclip.json"  # a run's settings: in its output folder and in final/
RELEASE_PREFIXES = ("face_clip_l", "face_clip_g")  # the released wrapper's tower attributes


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaceViTConfig(Section):
    """The released FaceCLIP face encoder: insightface arcface_torch's ViT-L
    (`vit_l_dp005_mask_005`): 112x112 input, patch 9 (12x12 tokens), depth 24, width 768,
    8 heads, 512-d identity feature."""

    image_size: int = 112
    patch_size: int = 9
    width: int = 768
    depth: int = 24
    heads: int = 8
    mlp_ratio: float = 4.0
    features: int = Field(512, description="identity feature size (the 'class token')")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid**2

    @classmethod
    def tiny(cls) -> FaceViTConfig:
        """A laptop-sized encoder with the same input and token grid, for tests."""
        return cls(width=16, depth=1, heads=2, features=16)


class TowerConfig(Section):
    """One open_clip text tower (`face_clip_l_14` / `face_clip_g_14`), read at the last layer
    after `ln_final`. `pretrained` is the open_clip tag its frozen weights come from when the
    encoder is not initialised from a released checkpoint."""

    model_name: str = Field(description="open_clip architecture, e.g. ViT-bigG-14")
    pretrained: str | None = Field("metaclip_fullcc", description="open_clip weights tag")
    embed_dim: int = Field(description="the CLIP model's joint embedding size")
    width: int
    heads: int
    layers: int
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float = -10.0

    def text_cfg(self) -> dict:
        return {
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "width": self.width,
            "heads": self.heads,
            "layers": self.layers,
        }

    @classmethod
    def l_14(cls) -> TowerConfig:
        return cls(model_name="ViT-L-14-quickgelu", embed_dim=768, width=768, heads=12,
                   layers=12, quick_gelu=True)  # fmt: skip

    @classmethod
    def g_14(cls) -> TowerConfig:
        return cls(model_name="ViT-bigG-14", embed_dim=1280, width=1280, heads=20, layers=32)

    @classmethod
    def tiny(cls, width: int) -> TowerConfig:
        return cls(model_name=f"tiny-{width}", pretrained=None, embed_dim=width, width=width,
                   heads=2, layers=1)  # fmt: skip


class FuserConfig(Section):
    """The GroundingDINO-style fuser of the release: `depth` layers, each a bi-attention block
    (face <-> text), a text enhancer layer and a deformable layer over the face grid. The text
    enhancer and the bi-attention use half the heads and half the feed-forward width."""

    depth: int = 6
    heads: int = 8
    ffn: int = 2048
    points: int = Field(4, description="deformable sampling points per head")
    text_dropout: float = 0.1
    fusion_dropout: float = 0.1
    layer_scale: float = Field(1e-4, description="initial gamma of the bi-attention updates")

    @classmethod
    def tiny(cls) -> FuserConfig:
        return cls(depth=2, heads=4, ffn=32, points=2)


def released_towers() -> list[TowerConfig]:
    return [TowerConfig.l_14(), TowerConfig.g_14()]


class EncoderConfig(Section):
    """Everything needed to rebuild a FaceCLIP encoder (both towers) around its weights."""

    towers: list[TowerConfig] = Field(default_factory=released_towers)
    face_vit: FaceViTConfig = Field(default_factory=FaceViTConfig)
    fuser: FuserConfig = Field(default_factory=FuserConfig)
    face_encoder: str | None = Field(
        None, description="FR-ViT weights (.pt/.safetensors); None = random init (tests only)"
    )
    init_from_reference: str | None = Field(
        None, description="a released face_clip_encoder.pt: every encoder weight comes from it"
    )
    face_input: Literal["unit", "signed"] = Field(
        "unit",
        description="what the face ViT sees: [0, 1] (the released inference) or [-1, 1]",
    )
    id_prompt: str = ID_PROMPT
    id_word: str = ID_WORD

    @classmethod
    def tiny(cls, widths: tuple[int, ...] = (32, 64)) -> EncoderConfig:
        return cls(
            towers=[TowerConfig.tiny(w) for w in widths],
            face_vit=FaceViTConfig.tiny(),
            fuser=FuserConfig.tiny(),
        )


class AlignConfig(Section):
    """The sigmoid contrastive pre-training: one loss per target space."""

    face_weight: float = 1.0
    text_weight: float = 1.0
    image_weight: float = 1.0
    logit_scale: float = Field(math.log(1 / 0.07), description="initial log of the logit scale")
    logit_bias: float = -10.0
