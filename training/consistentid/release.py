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
from training.state_dicts import check_state

RELEASE_ID_DIM = 512  # insightface buffalo_l embeddings


def load_release(path: str | Path) -> dict:
    """A released checkpoint from disk: a torch file (`weights_only`, no arbitrary objects) or a
    safetensors file with `image_proj.`, `adapter_modules.`, `FacialEncoder.` key prefixes."""
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a foreign or unsafe file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a torch checkpoint that loads safely ({reason})") from None


class SDXLRelease(UsageError):
    """ConsistentID's SDXL release, which converts (convert.py) but has no model here to run."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(
            f"{path} is ConsistentID's SDXL release (140 attention layers): its tensors convert "
            "(training.consistentid.convert), but this project's ConsistentID model and generator "
            "run on SD 1.5 only"
        )


def require_sd15(state: dict, path: str | Path) -> None:
    """Refuse the SDXL variant before anything loads for it."""
    if release_variant(state) == "sdxl":
        raise SDXLRelease(path)


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
    """The released checkpoint at `path` as a ConsistentID on `base_model`: sizes read from the
    file against the base UNet's layers, weights loaded strictly. SDXL's is refused first."""
    state = load_release(path)
    require_sd15(state, path)
    frozen = load_frozen(base_model, image_encoder)
    layers = [name.removesuffix(".processor") for name in frozen.unet.attn_processors]
    shape = release_shape(state, layers)
    model = ConsistentID(frozen, shape.id_dim, shape.options)
    load_release_into(model, path, state)
    return model


def release_to_folder(
    release: str | Path,
    folder: str | Path,
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    image_encoder: str = VIT_H,
) -> Path:
    """A released checkpoint -> an export folder (weights + config) the generator and
    `fgid evaluate` load. The base model must have SD 1.5's attention layout."""
    from safetensors.torch import save_file

    state = load_release(release)
    require_sd15(state, release)
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
        "base_model": base_model,
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
