"""Train FaceCLIP: stage "align" pre-trains the encoder, stage "sdxl" fine-tunes the SDXL UNet.

Both stages run on the shared loop (training/loop.py) over identity-aware FaceCLIP batches
(training/loader.py), so checkpoints, resume and metrics behave as for every model. The run's
settings go to `output_dir/faceclip.json` before training starts (a checkpoint folder's parent
then says how to rebuild the model) and, with the trainable weights, to `final/`:
- align: `final/encoder/` (fusion weights + encoder.json) and `final/alignment.safetensors`;
- sdxl: `final/unet/` (diffusers layout) and `final/encoder/` (the encoder it was trained on).
The sdxl stage reads the align stage's `final/` (or its `encoder/`) as `encoder_weights`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from training.faceclip.config import (
    RUN_FILE,
    AlignConfig,
    EncoderConfig,
    FaceViTConfig,
    FusionConfig,
)
from training.loader import LoaderConfig, faceclip_loader
from training.loop import TrainConfig, TrainResult, train
from training.preflight import check_faceclip

log = logging.getLogger(__name__)


class FaceCLIPTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal["align", "sdxl"] = Field(
        "align", description="align: encoder pre-training; sdxl: UNet fine-tune on its outputs"
    )
    dataset_url: str = Field(description="a built dataset (folder or s3://)")
    base_model: str = Field(
        "stabilityai/stable-diffusion-xl-base-1.0",
        description="SDXL folder or hub name: text towers, tokenizers, UNet, VAE, scheduler",
    )
    face_encoder: str | None = Field(
        None,
        description="arcface_torch ViT weights; None = random init (tests only, logs a warning); "
        "sdxl stage: None = the path the align stage recorded",
    )
    image_model: str | None = Field(
        "openai/clip-vit-large-patch14",
        description="align: CLIP model for the image space (CLIPModel or CLIPVisionModelWith"
        "Projection, hub name or folder); None = align with the face and text spaces only",
    )
    encoder_weights: str | None = Field(
        None, description="sdxl: the align stage's final/ folder (required)"
    )
    # Architecture (align stage; the sdxl stage rebuilds the encoder from its export's config)
    face_vit: FaceViTConfig = Field(default_factory=FaceViTConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    hidden_layer: int = Field(-2, description="text-tower hidden state fed to the fusion")
    align: AlignConfig = Field(default_factory=AlignConfig)
    condition_drop: float = Field(0.1, ge=0, le=1, description="sdxl: classifier-free drop")
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    train: TrainConfig

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(
            base_model=self.base_model,
            face_encoder=self.face_encoder,
            face_vit=self.face_vit,
            fusion=self.fusion,
            hidden_layer=self.hidden_layer,
        )


def build_model(config: FaceCLIPTrainConfig):
    """The module the loop trains: `AlignmentModel` or `FaceCLIPSDXL`."""
    if config.stage == "align":
        from training.faceclip.align import AlignmentModel, load_image_model
        from training.faceclip.encoder import FaceCLIPEncoder

        encoder = FaceCLIPEncoder.build(config.encoder_config())
        image_model = load_image_model(config.image_model) if config.image_model else None
        return AlignmentModel(encoder, image_model, config.align)
    from training.faceclip.sdxl import FaceCLIPSDXL

    if not config.encoder_weights:
        raise ValueError("the sdxl stage needs encoder_weights: the align stage's final/ folder")
    return FaceCLIPSDXL.build(
        config.base_model, config.encoder_weights, config.condition_drop, config.face_encoder
    )


def _run_record(config: FaceCLIPTrainConfig, model) -> dict:
    encoder = model.encoder.config.model_dump()
    return {
        "stage": config.stage,
        "base_model": config.base_model,
        "encoder": encoder,
        "encoder_weights": config.encoder_weights,
        "config": config.model_dump(),
    }


def train_faceclip(config: FaceCLIPTrainConfig) -> TrainResult:
    """Train one stage (or resume it) and export to `output_dir/final`. A dataset it cannot use
    or a missing weight is refused before any model loads."""
    check_faceclip(config)
    torch.manual_seed(config.train.seed)  # the same fresh weights for every run of a config
    model = build_model(config)
    output = Path(config.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    record = _run_record(config, model)
    (output / RUN_FILE).write_text(json.dumps(record, indent=2))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("FaceCLIP %s stage: %d trainable parameters", config.stage, trainable)

    def step_fn(module, batch):
        return module(batch)

    def make_batches(start: int):
        return faceclip_loader(config.dataset_url, config.loader, start_batch=start)

    def export(module, folder: Path) -> None:
        module.save_pretrained(folder)
        (folder / RUN_FILE).write_text(json.dumps(record, indent=2))

    return train(model, step_fn, make_batches, config.train, export=export)
