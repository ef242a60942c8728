"""Released FaceCLIP encoders on disk: to an export folder our tools load, and back."""

from __future__ import annotations

from pathlib import Path

import torch

from training.faceclip.config import EncoderConfig
from training.faceclip.convert import read_release, release_files, to_reference
from training.faceclip.encoder import FaceCLIPEncoder


def release_to_export(
    release: str | Path, folder: str | Path, config: EncoderConfig | None = None
) -> Path:
    """A released encoder -> an export folder (`encoder.safetensors` + `encoder.json`). The
    frozen towers and face ViTs stay in the release: the export records its path. `config`:
    the architecture (default: the released one)."""
    encoder_file, _ = release_files(release)
    config = (config or EncoderConfig()).model_copy(
        update={"init_from_reference": str(Path(encoder_file).resolve())}
    )
    encoder = FaceCLIPEncoder.build(config)  # a strict load of every released tensor
    return encoder.save_pretrained(folder)


def export_to_release(folder: str | Path, out: str | Path) -> Path:
    """An encoder export -> a state dict the reference `FaceCLIP_L_G_Wrapper` loads strictly."""
    encoder = FaceCLIPEncoder.from_pretrained(folder)
    if len(encoder.towers) != 2:
        raise ValueError(f"{folder}: the release has two towers, this encoder has another count")
    state = to_reference(encoder.state_dict())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().contiguous().cpu() for k, v in state.items()}, out)
    return out


__all__ = ["export_to_release", "read_release", "release_to_export"]
