"""The released FaceCLIP encoder (`face_clip_encoder.pt`) to our encoder's state and back.

The release is the state dict of its `FaceCLIP_L_G_Wrapper`: `face_clip_l.*` and `face_clip_g.*`
(one `TextImageBranch` each; 1,686 tensors at the released sizes), sometimes saved with a
`model.` prefix that its loader strips. Our towers keep the released attribute names under
`towers.{i}.`, so conversion is a prefix map, checked key by key and shape by shape.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.faceclip.config import RELEASE_PREFIXES
from training.state_dicts import check_state, torch_file

OURS = "towers"


def _strip(key: str) -> str:
    # The reference loader drops every "model." from a key; none of its own names contain it.
    return key.replace("model.", "")


def from_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released state dict (either spelling) -> our encoder's state-dict keys."""
    out = {}
    for key, value in state.items():
        tower, _, rest = _strip(key).partition(".")
        if tower not in RELEASE_PREFIXES or not rest:
            raise ValueError(f"{key!r} is not a key of the released FaceCLIP encoder")
        out[f"{OURS}.{RELEASE_PREFIXES.index(tower)}.{rest}"] = value
    return out


def to_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder's state dict -> what the reference `FaceCLIP_L_G_Wrapper` loads strictly."""
    out = {}
    for key, value in state.items():
        head, index, rest = (key.split(".", 2) + ["", ""])[:3]
        if head != OURS or not index.isdigit() or int(index) >= len(RELEASE_PREFIXES) or not rest:
            raise ValueError(f"{key!r} is not a key of a two-tower FaceCLIP encoder")
        out[f"{RELEASE_PREFIXES[int(index)]}.{rest}"] = value
    return out


def read_release(path: str | Path) -> dict[str, torch.Tensor]:
    """A released encoder file: a torch state dict (`weights_only`) or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own and OS errors
            raise ValueError(f"{path}: not a safetensors file ({error})") from None
    state = torch_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def load_reference(encoder: torch.nn.Module, state: dict | str | Path) -> None:
    """Load a released checkpoint (a state dict or its file) into `encoder`, strictly."""
    if not isinstance(state, dict):
        state = read_release(state)
    ours = from_reference(state)
    check_state(encoder.state_dict(), ours)
    encoder.load_state_dict(ours, strict=True)


ENCODER_FILE = "face_clip_encoder.pt"
UNET_FILE = "unet.pt"


def release_files(path: str | Path) -> tuple[Path, Path | None]:
    """(encoder file, UNet file or None) of a release: the encoder file itself (the UNet is
    looked for beside it), or a folder holding them (or their hub layout's `model/`)."""
    path = Path(path)
    if path.is_file():
        unet = path.parent / UNET_FILE
        return path, unet if unet.is_file() else None
    for folder in (path, path / "model"):
        if (folder / ENCODER_FILE).is_file():
            unet = folder / UNET_FILE
            return folder / ENCODER_FILE, unet if unet.is_file() else None
    raise FileNotFoundError(f"{path}: neither a released {ENCODER_FILE} nor a folder with one")


def is_release(path: str | Path) -> bool:
    try:
        release_files(path)
    except FileNotFoundError:
        return False
    return True
