"""FaceCLIP architecture settings: the face-recognition ViT, the fusion stack, the encoder."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

ID_PROMPT = "Photo of a id person."
ID_WORD = "id"
RUN_FILE = "faceclip.json"  # a run's settings: in its output folder and in final/


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


class FusionConfig(Section):
    """Feature-fusion blocks (the released config: 6 blocks; text self-attention with half the
    heads and half the feed-forward width of the face side, cross-attention width 1024)."""

    depth: int = Field(6, ge=1, description="stacked fusion blocks per text tower")
    face_heads: int = 8
    face_ffn: int = 2048
    text_heads: int = 4
    text_ffn: int = 1024
    cross_heads: int = 4
    cross_dim: int = 1024
    layer_scale: float = Field(
        1e-4, description="initial gain of the cross-attention updates (keeps init near the text)"
    )

    @classmethod
    def tiny(cls) -> FusionConfig:
        return cls(
            depth=1,
            face_heads=2,
            face_ffn=32,
            text_heads=2,
            text_ffn=32,
            cross_heads=2,
            cross_dim=16,
        )


class EncoderConfig(Section):
    """Everything needed to rebuild a FaceCLIP encoder around its exported weights."""

    base_model: str = Field(description="SDXL folder or hub name: text_encoder(_2), tokenizer(_2)")
    face_encoder: str | None = Field(
        None, description="FR-ViT weights (.pt/.pth/.safetensors); None = random init (tests only)"
    )
    face_vit: FaceViTConfig = Field(default_factory=FaceViTConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    hidden_layer: int = Field(
        -2,
        description="text-tower hidden state used per token (SDXL conditions on the penultimate)",
    )
    id_prompt: str = ID_PROMPT
    id_word: str = ID_WORD
    max_length: int = 77


class AlignConfig(Section):
    """The sigmoid contrastive pre-training: one loss per target space."""

    face_weight: float = 1.0
    text_weight: float = 1.0
    image_weight: float = 1.0
    logit_scale: float = Field(math.log(1 / 0.07), description="initial log of the logit scale")
    logit_bias: float = -10.0
