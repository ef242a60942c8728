"""ConsistentID's typed options: model shape and training objective (spec §5)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelOptions(BaseModel):
    """The trainable parts' shape. Widths default from the loaded models: the text width is the
    UNet's cross-attention width, the CLIP widths come from the image encoder's config."""

    model_config = ConfigDict(extra="forbid")

    num_id_tokens: int = Field(4, ge=1, description="ID tokens appended to the text sequence")
    id_depth: int = Field(4, ge=1, description="perceiver layers refining the ID tokens")
    facial_dim: int | None = Field(
        None,
        description="facial perceiver width; None = the CLIP projection width (1024 for "
        "ViT-H/14), so its input layer can start from CLIP's image projection",
    )
    facial_depth: int = Field(8, ge=1, description="facial perceiver layers")
    dim_head: int = Field(64, ge=1, description="perceiver attention head width")
    lora_rank: int = Field(128, ge=1, description="rank of the LoRA updates on every attention")
    ip_scale: float = Field(1.0, description="weight of the ID tokens' attention output")
    localization_layers: int = Field(
        5,
        ge=1,
        description="the central UNet blocks with cross-attention whose maps feed the "
        "localisation loss (SD1.5: down 1, down 2, mid, up 1, up 2)",
    )
    localization_blocks: list[str] | None = Field(
        None,
        description='explicit block names instead ("down_blocks.1", "mid_block", ...)',
    )
    # Beyond the release: off by default, so a trained model converts to the released format.
    facial_align: bool = Field(
        False,
        description="add the whole face as a token, a learned `slot` per role and an `align` "
        "transformer layer over face and region tokens before fusion (the release has neither)",
    )
    keep_facial_token: bool = Field(
        False,
        description="keep `<|facial|>` in the token sequence and fuse at its position, with this "
        "project's text composition (training/text.py); the release removes the marker and "
        "fuses at the region word (training/consistentid/prompt.py)",
    )


class LossOptions(BaseModel):
    """The training objective and its augmentations (spec §5)."""

    model_config = ConfigDict(extra="forbid")

    localization_weight: float = Field(0.01, ge=0, description="lambda of the localisation loss")
    localization_normalize: bool = Field(
        True, description="scale each token's map by its peak before comparing in and out"
    )
    foreground_loss_prob: float = Field(
        0.5, ge=0, le=1, description="per sample: the noise MSE counts foreground pixels only"
    )
    background_removal_prob: float = Field(
        0.5, ge=0, le=1, description="per sample: target pixels outside the foreground are blanked"
    )
    background_value: float = Field(
        -1.0, description="blanked pixel value in [-1, 1] (-1 is black, as the reference's)"
    )
    condition_drop_prob: float = Field(
        0.1, ge=0, le=1, description="per sample: text, images and ID embedding all dropped"
    )
