"""Released ConsistentID checkpoints on disk: read safely, load into a model, convert folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fgid.errors import UsageError
from training.consistentid.convert import (
    from_reference,
    release_shape,
    release_variant,
    skeleton,
    to_reference,
)
from training.consistentid.model import VIT_H, ConsistentID, load_frozen
from training.consistentid.pipeline import CONFIG, WEIGHTS, find_config, find_weights
from training.consistentid.sdxl import ConsistentIDXL, base_variant, load_frozen_xl
from training.state_dicts import check_state, torch_file

RELEASE_ID_DIM = 512  # insightface buffalo_l embeddings


def load_release(path: str | Path, mmap: bool = False) -> dict:
    """A released checkpoint from disk: a torch file (`weights_only`, no arbitrary objects) or a
    safetensors file with `image_proj.`, `adapter_modules.`, `FacialEncoder.` key prefixes.
    `mmap`: tensors mapped, not read (to look at keys and shapes), where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a safetensors file ({error})") from None
        state: dict[str, dict] = {}
        for key, tensor in flat.items():
            group, _, rest = key.partition(".")
            state.setdefault(group, {})[rest] = tensor
        return state
    return torch_file(path, mmap)


NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def model_variant(state: dict, base_model: str, path: str | Path) -> str:
    """The variant a released file runs as on `base_model`: the file's, which the base must
    have; a file for another UNet (a small test model) takes the base's."""
    base = base_variant(base_model)
    variant = release_variant(state) or base
    if variant != base:
        raise UsageError(
            f"{path} is ConsistentID's {NAMES[variant]} release, {base_model} is an "
            f"{NAMES[base]} model: give an {NAMES[variant]} base model (--base-model)"
        )
    return variant


def default_base(variant: str) -> str:
    from training.weights import SD15, SDXL

    return SDXL if variant == "sdxl" else SD15


def weights_variant(weights: str | Path) -> tuple[str | None, str | None]:
    """(variant, recorded base model) of ConsistentID weights: a released file (its variant,
    None for another UNet's layers; read memory-mapped) or a folder (its config's); (None,
    None) for what is neither (the loader names the problem)."""
    path = Path(weights)
    try:
        if path.is_file():
            return release_variant(load_release(path, mmap=True)), None
        config = json.loads(find_config(path).read_text())
    except (ValueError, OSError):
        return None, None
    return config.get("variant", "sd15"), config.get("base_model")


def load_release_into(model: nn.Module, path: str | Path, state: dict | None = None) -> None:
    """Load a released checkpoint (`state`, if already read from `path`) into a ConsistentID of
    its sizes: strict, every missing or misshapen tensor named in one line."""
    state = from_reference(load_release(path) if state is None else state, model.processor_names())
    expected = model.state_dict()
    try:
        check_state(expected, state)
    except ValueError as error:
        raise ValueError(f"{path} does not fit this model: {error}") from None
    model.load_state_dict(state, strict=True)


def release_model(
    path: str | Path, base_model: str, image_encoder: str | None = None
) -> ConsistentID:
    """The released checkpoint at `path` as a ConsistentID (ConsistentIDXL for the SDXL release)
    on `base_model`: sizes read from the file against the base UNet's layers, weights loaded
    strictly. A file and a base of different variants are refused first."""
    state = load_release(path)
    sdxl = model_variant(state, base_model, path) == "sdxl"
    frozen = (load_frozen_xl if sdxl else load_frozen)(base_model, image_encoder)
    layers = [name.removesuffix(".processor") for name in frozen.unet.attn_processors]
    shape = release_shape(state, layers)
    model = (ConsistentIDXL if sdxl else ConsistentID)(frozen, shape.id_dim, shape.options)
    load_release_into(model, path, state)
    return model


def release_to_folder(
    release: str | Path,
    folder: str | Path,
    base_model: str | None = None,
    image_encoder: str = VIT_H,
) -> Path:
    """A released checkpoint -> an export folder (weights + config) the generator and
    `fgid evaluate` load. The config records the variant (SD 1.5 or SDXL, from the file's
    layers) and the base model (default: that variant's); the base must have its layers."""
    from safetensors.torch import save_file

    state = load_release(release)
    variant = release_variant(state) or "sd15"
    ours = from_reference(state)
    shape = release_shape(state)
    check_state(skeleton(shape).state_dict(), ours)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().contiguous() for k, v in ours.items()}
    save_file(weights, str(folder / WEIGHTS))
    meta = {
        "id_dim": shape.id_dim,
        "options": shape.options.model_dump(),
        "variant": variant,
        "base_model": base_model or default_base(variant),
        "image_encoder": image_encoder,
    }
    (folder / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder / WEIGHTS


def folder_to_release(folder: str | Path, out: str | Path) -> Path:
    """An export or checkpoint folder -> a released-format torch file (`image_proj`,
    `adapter_modules`, `FacialEncoder`) for the reference pipeline's `load_ConsistentID_model`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    options = json.loads(find_config(folder).read_text()).get("options", {})
    if options.get("keep_facial_token"):
        raise ValueError(
            f"{folder} was trained with keep_facial_token: the reference pipeline would feed it "
            "another text than it learnt"
        )
    release = to_reference(load_file(str(find_weights(folder))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(release, out)
    return out
