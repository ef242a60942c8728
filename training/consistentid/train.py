"""Train ConsistentID on a built dataset: typed config, the shared loop, export of the trainable
weights for training/consistentid/pipeline.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from training.consistentid.config import LossOptions, ModelOptions
from training.consistentid.model import ConsistentID
from training.consistentid.pipeline import CONFIG, WEIGHTS
from training.consistentid.release import load_release_into
from training.loader import LoaderConfig, consistentid_loader
from training.loop import TrainConfig, TrainResult, train
from training.preflight import check_consistentid

log = logging.getLogger(__name__)

_FROZEN_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


class ConsistentIDTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_url: str = Field(description="a built dataset: local folder or s3://")
    base_model: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="hub name or folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/",
    )
    image_encoder: str | None = Field(
        None,
        description="CLIP vision tower, hub name or folder; None = base_model's image_encoder/ "
        "if it has one, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the spec's ViT-H/14)",
    )
    id_dim: int | None = Field(
        None,
        description="ID embedding width; None = the dataset's, which must be 512-d (ArcFace, a "
        "full build); set it to the dataset's width to train on another on purpose",
    )
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    train: TrainConfig
    model: ModelOptions = Field(default_factory=ModelOptions)
    loss: LossOptions = Field(default_factory=LossOptions)
    init_from_reference: str | None = Field(
        None,
        description="a released ConsistentID checkpoint (.bin/.pt/.safetensors) to start from; "
        "needs the default model options and a 512-d ID embedding (the release's)",
    )


def export_config(config: ConsistentIDTrainConfig, id_dim: int) -> dict:
    """What the pipeline needs beside the weights to rebuild the trainable modules."""
    return {
        "id_dim": id_dim,
        "options": config.model.model_dump(),
        "base_model": config.base_model,
        "image_encoder": config.image_encoder,
    }


def export(model: ConsistentID, folder: Path, meta: dict) -> None:
    """The trainable weights only (safetensors) and the config to rebuild them."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(Path(folder) / WEIGHTS))
    (Path(folder) / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))


def build_model(config: ConsistentIDTrainConfig, id_dim: int) -> ConsistentID:
    model = ConsistentID.from_pretrained(
        config.base_model,
        id_dim,
        image_encoder=config.image_encoder,
        options=config.model,
        loss=config.loss,
        frozen_dtype=_FROZEN_DTYPE[config.train.mixed_precision],
    )
    if config.init_from_reference:
        load_release_into(model, config.init_from_reference)
        log.info("started from the released weights %s", config.init_from_reference)
    return model


def loader_config(config: ConsistentIDTrainConfig, model: ConsistentID) -> LoaderConfig:
    """The loader's CLIP preprocessing must be the image encoder's: its input side, mean, std."""
    frozen = model.frozen
    return config.loader.model_copy(
        update={
            "clip_size": frozen.image_encoder.config.image_size,
            "clip_mean": tuple(frozen.image_mean),
            "clip_std": tuple(frozen.image_std),
        }
    )


def train_consistentid(
    config: ConsistentIDTrainConfig, observe: Callable[[dict], None] | None = None
) -> TrainResult:
    """Train (or resume, per config.train.resume_from) and export to `output_dir/final`.
    `observe(batch)` sees every batch before its step (logging, tests of the data order).

    A dataset it cannot use or a missing weight is refused before any model loads."""
    id_dim = check_consistentid(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)  # the same initial weights for the same seed
        model = build_model(config, id_dim)
    loader = loader_config(config, model)
    meta = export_config(config, model.id_dim)
    output = Path(config.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # Beside the checkpoints too, so a checkpoint-{step} folder loads in the pipeline.
    (output / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("ConsistentID: %.1fM trainable parameters", trainable / 1e6)

    def make_batches(start: int):
        # training.loop keeps the loader's draws off the training RNG.
        return consistentid_loader(
            config.dataset_url,
            model.frozen.tokenizer,
            loader,
            start,
            keep_facial_token=config.model.keep_facial_token,
        )

    def step_fn(model: torch.nn.Module, batch: dict):
        if observe is not None:
            observe(batch)
        return model(batch)  # ConsistentID.forward: the loss of one batch

    return train(
        model, step_fn, make_batches, config.train, export=lambda m, out: export(m, out, meta)
    )
