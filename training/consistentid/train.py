"""Train ConsistentID (SD 1.5 or SDXL) on a built dataset: typed config, the shared loop, export
of the trainable weights for training/consistentid/pipeline.py and sdxl.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fgid.errors import UsageError
from training.consistentid.config import LossOptions, ModelOptions
from training.consistentid.model import ConsistentID
from training.consistentid.pipeline import CONFIG, WEIGHTS
from training.consistentid.release import NAMES, load_release_into, weights_variant
from training.consistentid.sdxl import SDXL_LOCALIZATION_LAYERS, ConsistentIDXL, base_variant
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
        description="a released ConsistentID checkpoint (.bin/.pt/.safetensors; SD 1.5 or "
        "SDXL) to start from; needs the default model options and a 512-d ID embedding (the "
        "release's)",
    )
    variant: Literal["sd15", "sdxl"] | None = Field(
        None,
        description="sd15, or sdxl (ConsistentID-SDXL, training/consistentid/sdxl.py); None = "
        "init_from_reference's (a released file's layers), else base_model's (a local folder's "
        "UNet; SDXL base 1.0 by name). SDXL's defaults: base_model SDXL base 1.0, "
        "loader.resolution 1024, model.localization_layers 3 (the reference SDXL trainer's)",
    )


SDXL_RESOLUTION = 1024  # the reference SDXL trainer's


def _local_variant(base_model: str) -> str | None:
    """A local base folder's variant (its UNet's conditioning); None for a hub name."""
    return base_variant(base_model) if Path(base_model, "unet").is_dir() else None


def _chosen(settings, field: str) -> bool:
    """Whether `field` of `settings` was given other than its default. A config that went
    through a flow's parameters (serialised, then validated again) has every field set, so
    being set alone says nothing; the SD 1.5 default there is taken as no choice."""
    default = type(settings).model_fields[field].default
    return field in settings.model_fields_set and getattr(settings, field) != default


def resolve_variant(config: ConsistentIDTrainConfig) -> ConsistentIDTrainConfig:
    """`config` with its variant decided, SDXL's defaults filled in where not given; a base
    model or released file of the other variant is refused before anything loads."""
    from training.weights import SDXL

    init = weights_variant(config.init_from_reference)[0] if config.init_from_reference else None
    base = _local_variant(config.base_model)
    variant = config.variant or init or base or ("sdxl" if config.base_model == SDXL else "sd15")
    update: dict = {"variant": variant}
    if variant == "sdxl":
        if not _chosen(config, "base_model"):
            update["base_model"], base = SDXL, None
        if not _chosen(config.loader, "resolution"):
            update["loader"] = config.loader.model_copy(update={"resolution": SDXL_RESOLUTION})
        if not _chosen(config.model, "localization_layers"):
            layers = {"localization_layers": SDXL_LOCALIZATION_LAYERS}
            update["model"] = config.model.model_copy(update=layers)
    for what, found in (("init_from_reference", init), ("base_model", base)):
        if found is not None and found != variant:
            raise UsageError(
                f"{what} {update.get(what, getattr(config, what))} is {NAMES[found]}, the "
                f"model to train is {NAMES[variant]}: give an {NAMES[variant]} one (or set "
                f"variant={found})"
            )
    return config.model_copy(update=update)


def export_config(config: ConsistentIDTrainConfig, model: ConsistentID) -> dict:
    """What the pipeline needs beside the weights to rebuild the trainable modules."""
    return {
        "id_dim": model.id_dim,
        "options": model.options.model_dump(),
        "variant": config.variant or "sd15",
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
    """ConsistentID, or ConsistentIDXL for the SDXL variant (a resolved config), from the
    released weights when `init_from_reference` names them."""
    cls = ConsistentIDXL if config.variant == "sdxl" else ConsistentID
    model = cls.from_pretrained(
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
    config = resolve_variant(config)
    id_dim = check_consistentid(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)  # the same initial weights for the same seed
        model = build_model(config, id_dim)
    loader = loader_config(config, model)
    meta = export_config(config, model)
    output = Path(config.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # Beside the checkpoints too, so a checkpoint-{step} folder loads in the pipeline.
    (output / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %.1fM trainable parameters", type(model).__name__, trainable / 1e6)

    def make_batches(start: int):
        # training.loop keeps the loader's draws off the training RNG.
        return consistentid_loader(
            config.dataset_url,
            model.frozen.tokenizer,
            loader,
            start,
            keep_facial_token=config.model.keep_facial_token,
            tokenizer_2=getattr(model.frozen, "tokenizer_2", None),
        )

    def step_fn(model: torch.nn.Module, batch: dict):
        if observe is not None:
            observe(batch)
        return model(batch)  # ConsistentID.forward: the loss of one batch

    return train(
        model, step_fn, make_batches, config.train, export=lambda m, out: export(m, out, meta)
    )
