"""The released ConsistentID checkpoint <-> this project's ConsistentID state dict, both ways.

The release (JackAILab/ConsistentID, `load_ConsistentID_model`) is a torch dict of three state
dicts, each loaded with `strict=True`: `image_proj` (ProjPlusModel), `adapter_modules` (a ModuleList
over `unet.attn_processors`, in the UNet's processor order) and `FacialEncoder`. With the default
ModelOptions our trainable parts are the same tensors under other names; the options that add
tensors (`facial_align`) have no released counterpart and are refused by `to_reference`.
The public code has two variants with the same key names: SD 1.5 (768-wide text, 32 attention
layers) and SDXL (2048-wide, 140 layers, `pipline_StableDiffusionXL_ConsistentID.py`); a file's
variant is read from its number of attention processors (`release_variant`).
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


def _attention_layers(blocks: Sequence[tuple[str, int, int]]) -> list[str]:
    """(block, attentions, transformer blocks in each) -> attention layer names in order."""
    names = []
    for block, attentions, depth in blocks:
        for a, t in ((a, t) for a in range(attentions) for t in range(depth)):
            names += [f"{block}.attentions.{a}.transformer_blocks.{t}.attn{k}" for k in (1, 2)]
    return names


def sd15_processors() -> list[str]:
    """SD 1.5's attention layers in `unet.attn_processors` order (down, up, then mid)."""
    blocks = [(f"down_blocks.{i}", 2, 1) for i in range(3)]
    blocks += [(f"up_blocks.{i}", 3, 1) for i in (1, 2, 3)]
    return _attention_layers([*blocks, ("mid_block", 1, 1)])


def sdxl_processors() -> list[str]:
    """SDXL's 140 attention layers in processor order: 2 and 10 transformer blocks per attention
    in its two cross-attention levels, 10 in the mid block."""
    return _attention_layers(
        [("down_blocks.1", 2, 2), ("down_blocks.2", 2, 10), ("up_blocks.0", 3, 10),
         ("up_blocks.1", 3, 2), ("mid_block", 1, 10)]
    )  # fmt: skip


# The released variants by their UNet's attention layers (their keys are the same; the widths
# differ: 768 and 2048).
VARIANTS = {"sd15": sd15_processors, "sdxl": sdxl_processors}


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


def _adapter_count(adapters: Mapping) -> int:
    return len({m.group(1) for k in adapters if (m := _ADAPTER.match(k))})


def release_variant(state: Mapping) -> str | None:
    """The released variant ("sd15" or "sdxl") whose UNet has as many attention layers as the
    file has processors, at any width (small test files too); None for another UNet."""
    count = _adapter_count(_groups(state)["adapter_modules"])
    return next((v for v, layers in VARIANTS.items() if len(layers()) == count), None)


def _processor_names(state: Mapping, processors: Sequence[str] | None) -> list[str]:
    if processors is not None:
        return list(processors)
    variant = release_variant(state)
    if variant is None:
        count = _adapter_count(_groups(state)["adapter_modules"])
        layouts = ", ".join(f"{v} {len(layers())}" for v, layers in VARIANTS.items())
        raise ValueError(
            f"adapter_modules holds {count} attention processors, no released UNet has that "
            f"many ({layouts}): give the UNet's processor names"
        )
    return VARIANTS[variant]()


def from_reference(
    state: Mapping, processors: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The released dict -> our state dict. `processors`: the UNet's attention layers in
    processor order (ConsistentID.processor_names()); default the layers of the released
    variant (SD 1.5 or SDXL) with as many of them as the file."""
    groups = _groups(state)
    adapters = groups["adapter_modules"]
    count = _adapter_count(adapters)
    names = _processor_names(groups, processors)
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
    """The sizes of `state`'s tensors; `processors` as for `from_reference`."""
    groups = _groups(state)
    proj, facial = groups["image_proj"], groups["FacialEncoder"]
    adapters = groups["adapter_modules"]
    names = _processor_names(groups, processors)

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
