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
    FuserConfig,
    TowerConfig,
    released_towers,
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
        description="SDXL folder or hub name: UNet, VAE, scheduler (text towers: open_clip)",
    )
    init_from_reference: str | None = Field(
        None,
        description="a FaceCLIP release (face_clip_encoder.pt, or a folder with it and unet.pt): "
        "align starts from its encoder; sdxl uses its encoder and starts from its UNet",
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
        None, description="sdxl: the align stage's final/ folder (or init_from_reference)"
    )
    # Architecture (align stage; the sdxl stage rebuilds the encoder from its export's config)
    towers: list[TowerConfig] = Field(default_factory=released_towers)
    face_vit: FaceViTConfig = Field(default_factory=FaceViTConfig)
    fuser: FuserConfig = Field(default_factory=FuserConfig)
    image_branch: bool = Field(
        False, description="align: also score each tower against its open_clip image branch"
    )
    align: AlignConfig = Field(default_factory=AlignConfig)
    condition_drop: float = Field(0.1, ge=0, le=1, description="sdxl: classifier-free drop")
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    train: TrainConfig

    def encoder_config(self) -> EncoderConfig:
        reference = None
        if self.init_from_reference:
            from training.faceclip.convert import release_files

            reference = str(release_files(self.init_from_reference)[0])
        return EncoderConfig(
            towers=self.towers,
            face_encoder=self.face_encoder,
            face_vit=self.face_vit,
            fuser=self.fuser,
            init_from_reference=reference,
        )


def build_model(config: FaceCLIPTrainConfig):
    """The module the loop trains: `AlignmentModel` or `FaceCLIPSDXL`."""
    if config.stage == "align":
        from training.faceclip.align import AlignmentModel, load_image_model
        from training.faceclip.encoder import FaceCLIPEncoder
        from training.faceclip.released import ImageBranch

        encoder = FaceCLIPEncoder.build(config.encoder_config())
        image_model = load_image_model(config.image_model) if config.image_model else None
        branches = [ImageBranch(t) for t in config.towers] if config.image_branch else None
        return AlignmentModel(encoder, image_model, config.align, branches)
    from training.faceclip.sdxl import FaceCLIPSDXL

    if not config.encoder_weights and not config.init_from_reference:
        raise ValueError(
            "the sdxl stage needs encoder_weights (the align stage's final/ folder) or "
            "init_from_reference (a FaceCLIP release)"
        )
    return FaceCLIPSDXL.build(
        config.base_model,
        config.encoder_weights or config.encoder_config(),
        config.condition_drop,
        config.face_encoder,
        unet_from_reference=config.init_from_reference,
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
