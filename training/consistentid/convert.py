"""The released ConsistentID checkpoint <-> this project's ConsistentID state dict, both ways.

The release (JackAILab/ConsistentID, `load_ConsistentID_model`) is a torch dict of three state
dicts, each loaded with `strict=True`: `image_proj` (ProjPlusModel), `adapter_modules` (a ModuleList
over `unet.attn_processors`, in the UNet's processor order) and `FacialEncoder`. With the default
ModelOptions our trainable parts are the same tensors under other names; the options that add
tensors (`facial_align`) have no released counterpart and are refused by `to_reference`.
Files on disk: training/consistentid/release.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from training.consistentid.attention import make_processor
from training.consistentid.config import ModelOptions
from training.consistentid.encoders import FacialEncoder, IDProjection

GROUPS = ("image_proj", "adapter_modules", "FacialEncoder")
# The reference's own weight-export script names the first group this way.
GROUP_ALIASES = {"image_proj_model": "image_proj"}
RELEASE_DIM_HEAD = 64  # both perceivers of the release; shapes do not record it


def sd15_processors() -> list[str]:
    """SD 1.5's attention layers in `unet.attn_processors` order (down, up, then mid)."""
    blocks = [(f"down_blocks.{i}", 2) for i in range(3)]
    blocks += [(f"up_blocks.{i}", 3) for i in (1, 2, 3)]
    names = []
    for block, attentions in [*blocks, ("mid_block", 1)]:
        for a in range(attentions):
            names += [f"{block}.attentions.{a}.transformer_blocks.0.attn{k}" for k in (1, 2)]
    return names


def processor_order(name: str) -> tuple:
    """Sort key giving diffusers' processor order: down blocks, up blocks, mid block, then
    indices numerically (its modules register in that order)."""
    parts = name.split(".")
    rank = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[parts[0]]
    return (rank, *(int(p) if p.isdigit() else p for p in parts[1:]))


@dataclass(frozen=True)
class _Rule:
    ours: str  # our key prefix (a whole key when it does not end with ".")
    group: str
    ref: str  # the reference key prefix inside `group`
    parts: Mapping[str, str] = field(default_factory=dict)  # renamed parts of the remainder


_PERCEIVER = {"norm_x": "norm1", "norm_latents": "norm2"}
_MLP = {"0": "layernorm", "1": "fc1", "3": "fc2"}
_RULES = (
    _Rule("id_projection.mlp.", "image_proj", "proj."),
    _Rule("id_projection.norm.", "image_proj", "norm."),
    _Rule("id_projection.resampler.", "image_proj", "perceiver_resampler.", _PERCEIVER),
    _Rule("facial_encoder.latent", "FacialEncoder", "visual_projection.latents"),
    _Rule("facial_encoder.resampler.", "FacialEncoder", "visual_projection.", _PERCEIVER),
    _Rule("facial_encoder.fuse_in.net.", "FacialEncoder", "fuse_module.mlp1.", _MLP),
    _Rule("facial_encoder.fuse_out.net.", "FacialEncoder", "fuse_module.mlp2.", _MLP),
    _Rule("facial_encoder.norm.", "FacialEncoder", "fuse_module.layer_norm."),
)
_ADAPTER = re.compile(r"^(\d+)\.(.+)$")


def _matches(key: str, prefix: str) -> bool:
    return key.startswith(prefix) if prefix.endswith(".") else key == prefix


def _rename(rest: str, parts: Mapping[str, str]) -> str:
    return ".".join(parts.get(p, p) for p in rest.split(".")) if rest else rest


def _our_adapter_key(name: str) -> str:
    return "adapters." + name.replace(".", "/") + "/processor"


def _groups(state: Mapping) -> dict[str, Mapping[str, torch.Tensor]]:
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a dict of {', '.join(GROUPS)}, got {type(state).__name__}")
    groups = {GROUP_ALIASES.get(k, k): v for k, v in state.items()}
    missing = [g for g in GROUPS if g not in groups]
    unexpected = sorted(str(g) for g in groups if g not in GROUPS)
    if missing or unexpected or not all(isinstance(v, Mapping) for v in groups.values()):
        raise ValueError(
            f"not a released ConsistentID checkpoint: groups missing {missing}, "
            f"unexpected {unexpected} (expected {', '.join(GROUPS)}, each a state dict)"
        )
    return groups


def from_reference(
    state: Mapping, processors: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The released dict -> our state dict. `processors`: the UNet's attention layers in
    processor order (ConsistentID.processor_names()); default SD 1.5's."""
    groups = _groups(state)
    adapters = groups["adapter_modules"]
    count = len({m.group(1) for k in adapters if (m := _ADAPTER.match(k))})
    names = list(processors) if processors is not None else sd15_processors()
    if count != len(names):
        raise ValueError(
            f"adapter_modules holds {count} attention processors, the UNet has {len(names)}"
        )
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for group in ("image_proj", "FacialEncoder"):
        for key, tensor in groups[group].items():
            rule = max(
                (r for r in _RULES if r.group == group and _matches(key, r.ref)),
                key=lambda r: len(r.ref),
                default=None,
            )
            if rule is None:
                unexpected.append(f"{group}.{key}")
                continue
            inverse = {v: k for k, v in rule.parts.items()}
            out[rule.ours + _rename(key[len(rule.ref) :], inverse)] = tensor
    for key, tensor in adapters.items():
        match = _ADAPTER.match(key)
        if match is None:
            unexpected.append(f"adapter_modules.{key}")
            continue
        out[f"{_our_adapter_key(names[int(match.group(1))])}.{match.group(2)}"] = tensor
    if unexpected:
        raise ValueError(f"keys the released model does not have: {', '.join(unexpected)}")
    return out


def to_reference(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict -> the released dict, adapters numbered in diffusers' processor order."""
    out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith("adapters."):
            name, _, rest = key.removeprefix("adapters.").partition("/processor.")
            adapters.setdefault(name.replace("/", "."), {})[rest] = tensor
            continue
        rule = next((r for r in _RULES if _matches(key, r.ours)), None)
        if rule is None:
            unknown.append(key)
            continue
        out[rule.group][rule.ref + _rename(key[len(rule.ours) :], rule.parts)] = tensor
    if unknown:
        raise ValueError(
            f"tensors the released model lacks: {', '.join(sorted(unknown))} "
            "(trained with facial_align; only default options convert)"
        )
    for index, name in enumerate(sorted(adapters, key=processor_order)):
        for rest, tensor in adapters[name].items():
            out["adapter_modules"][f"{index}.{rest}"] = tensor
    return out


# -- what a released file holds, and checking it --------------------------------------------------


@dataclass(frozen=True)
class ReleaseShape:
    """The sizes a released checkpoint was built with, read from its tensors."""

    id_dim: int
    clip_dim: int
    width: int
    options: ModelOptions
    processors: tuple[tuple[str, int, int, bool], ...]  # (name, hidden, context, cross)


def release_shape(state: Mapping, processors: Sequence[str] | None = None) -> ReleaseShape:
    groups = _groups(state)
    proj, facial = groups["image_proj"], groups["FacialEncoder"]
    adapters = groups["adapter_modules"]
    names = list(processors) if processors is not None else sd15_processors()

    def depth(group: Mapping, prefix: str) -> int:
        return sum(1 for k in group if re.fullmatch(rf"{prefix}layers\.\d+\.0\.to_q\.weight", k))

    try:
        width = proj["norm.weight"].shape[0]
        options = ModelOptions(
            num_id_tokens=proj["proj.2.weight"].shape[0] // width,
            id_depth=max(1, depth(proj, r"perceiver_resampler\.")),
            facial_dim=facial["visual_projection.proj_in.weight"].shape[0],
            facial_depth=max(1, depth(facial, r"visual_projection\.")),
            dim_head=RELEASE_DIM_HEAD,
            lora_rank=adapters["0.to_q_lora.down.weight"].shape[0],
        )
        layers = tuple(
            (
                name,
                adapters[f"{i}.to_q_lora.up.weight"].shape[0],
                adapters[f"{i}.to_k_lora.down.weight"].shape[1],
                f"{i}.to_k_ip.weight" in adapters,
            )
            for i, name in enumerate(names)
        )
        return ReleaseShape(
            id_dim=proj["proj.0.weight"].shape[1],
            clip_dim=proj["perceiver_resampler.proj_in.weight"].shape[1],
            width=width,
            options=options,
            processors=layers,
        )
    except KeyError as error:
        raise ValueError(f"not a released ConsistentID checkpoint: no tensor {error}") from None


def skeleton(shape: ReleaseShape) -> nn.Module:
    """Our trainable parts at the release's sizes, on the meta device (shapes only): the module
    tree ConsistentID builds around a UNet with these attention layers."""
    opts = shape.options
    with torch.device("meta"):
        root = nn.Module()
        root.id_projection = IDProjection(
            shape.id_dim, shape.clip_dim, shape.width, opts.num_id_tokens, opts.id_depth,
            opts.dim_head,
        )  # fmt: skip
        root.facial_encoder = FacialEncoder(
            shape.clip_dim, shape.width, opts.facial_dim, opts.facial_depth, opts.dim_head
        )
        root.adapters = nn.ModuleDict(
            {
                _our_adapter_key(name).removeprefix("adapters."): make_processor(
                    cross, hidden, context, opts.lora_rank, opts.num_id_tokens
                )
                for name, hidden, context, cross in shape.processors
            }
        )
    return root
