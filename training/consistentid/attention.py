"""Trainable attention processors for a frozen diffusers UNet: LoRA on every attention, IP-Adapter
style key/value projections for the ID tokens on cross-attention, and the attention maps of the
facial tokens that the localisation loss reads.

The maps are taken from cross-attention (text tokens as keys), not where the reference code
hooks them: see training/consistentid/loss.py for why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class LoRA(nn.Module):
    """A rank-r update `up(down(x))`; `up` starts at zero so the frozen layer is unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


@dataclass
class MapStore:
    """Shared by the processors of the localisation layers. While `token_index` (B, K) is set,
    each of them appends the attention probabilities of those text positions, (B, heads, N, K)."""

    token_index: torch.Tensor | None = None
    maps: list[torch.Tensor] = field(default_factory=list)

    def start(self, token_index: torch.Tensor | None) -> None:
        self.token_index, self.maps = token_index, []

    def stop(self) -> list[torch.Tensor]:
        maps, self.token_index, self.maps = self.maps, None, []
        return maps


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class LoRAAttnProcessor(nn.Module):
    """Self-attention (attn1): the frozen projections plus a LoRA on q, k, v and out."""

    def __init__(self, hidden_size: int, context_size: int, rank: int):
        super().__init__()
        self.to_q_lora = LoRA(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRA(context_size, hidden_size, rank)
        self.to_v_lora = LoRA(context_size, hidden_size, rank)
        self.to_out_lora = LoRA(hidden_size, hidden_size, rank)

    def project(self, attn, hidden_states, context):
        q = attn.to_q(hidden_states) + self.to_q_lora(hidden_states)
        k = attn.to_k(context) + self.to_k_lora(context)
        v = attn.to_v(context) + self.to_v_lora(context)
        return _heads(q, attn.heads), _heads(k, attn.heads), _heads(v, attn.heads)

    def out(self, attn, hidden_states):
        hidden_states = attn.to_out[0](hidden_states) + self.to_out_lora(hidden_states)
        return attn.to_out[1](hidden_states)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        q, k, v = self.project(attn, hidden_states, hidden_states)
        return self.out(attn, _merge(F.scaled_dot_product_attention(q, k, v)))


class IDAttnProcessor(LoRAAttnProcessor):
    """Cross-attention (attn2). The context is [text tokens; ID tokens]: the text goes through the
    frozen projections plus LoRA, the last `num_tokens` through their own key/value projections
    (initialised from the frozen ones), and the two attention outputs are added."""

    def __init__(
        self,
        hidden_size: int,
        context_size: int,
        rank: int,
        num_tokens: int,
        scale: float = 1.0,
        store: MapStore | None = None,
    ):
        super().__init__(hidden_size, context_size, rank)
        self.num_tokens, self.scale = num_tokens, scale
        self.to_k_ip = nn.Linear(context_size, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(context_size, hidden_size, bias=False)
        self.store = store  # set on localisation layers only

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        text = encoder_hidden_states[:, : -self.num_tokens]
        ids = encoder_hidden_states[:, -self.num_tokens :]
        q, k, v = self.project(attn, hidden_states, text)
        store = self.store
        if store is not None and store.token_index is not None:
            # Explicit softmax: the loss needs the probabilities, which SDPA never exposes.
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), -1)
            out = probs.to(v.dtype) @ v
            index = store.token_index.clamp(min=0)  # -1 (no token) is masked out by the loss
            b, h, n, _ = probs.shape
            gathered = probs.gather(3, index[:, None, None, :].expand(b, h, n, index.shape[1]))
            store.maps.append(gathered)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        ip_k = _heads(self.to_k_ip(ids.to(self.to_k_ip.weight.dtype)).to(q.dtype), attn.heads)
        ip_v = _heads(self.to_v_ip(ids.to(self.to_v_ip.weight.dtype)).to(q.dtype), attn.heads)
        out = out + self.scale * F.scaled_dot_product_attention(q, ip_k, ip_v)
        return self.out(attn, _merge(out))


def attention_blocks(unet) -> list[str]:
    """UNet blocks that hold cross-attention, in the order the sample flows through them."""
    names = [f"down_blocks.{i}" for i, b in enumerate(unet.down_blocks) if hasattr(b, "attentions")]
    if hasattr(unet.mid_block, "attentions"):
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i, b in enumerate(unet.up_blocks) if hasattr(b, "attentions")]
    return names


def central_blocks(unet, count: int) -> list[str]:
    """The `count` central attention blocks: SD1.5's 7 give down 1, down 2, mid, up 1, up 2."""
    blocks = attention_blocks(unet)
    start = max(0, (len(blocks) - count) // 2)
    return blocks[start : start + count]


def _in_block(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(block + ".") for block in blocks)


def make_processor(
    cross: bool, hidden: int, context: int, rank: int, num_tokens: int, scale: float = 1.0
) -> nn.Module:
    """The processor of one attention: LoRA on self-attention, LoRA + ID keys on cross."""
    if cross:
        return IDAttnProcessor(hidden, context, rank, num_tokens, scale)
    return LoRAAttnProcessor(hidden, context, rank)


def install_processors(
    unet, rank: int, num_tokens: int, scale: float, localization_blocks: list[str]
) -> tuple[nn.ModuleDict, MapStore]:
    """Replace every attention processor of `unet` with a trainable one. Returns them (keys are
    the processor names with dots as "/", a ModuleDict needs dot-free keys) and the map store."""
    store = MapStore()
    unknown = set(localization_blocks) - set(attention_blocks(unet))
    if unknown:
        raise ValueError(f"no cross-attention in UNet blocks {sorted(unknown)}")
    procs: dict[str, nn.Module] = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        plain = module.group_norm is None and module.spatial_norm is None
        plain = plain and not module.norm_cross and not module.residual_connection
        if not plain or module.rescale_output_factor != 1.0:
            raise ValueError(f"{name}: only transformer-block attention is supported")
        hidden, context = module.to_q.out_features, module.to_k.in_features
        local = store if _in_block(name, localization_blocks) else None
        proc = make_processor(module.is_cross_attention, hidden, context, rank, num_tokens, scale)
        if module.is_cross_attention:
            proc.store = local
            with torch.no_grad():
                proc.to_k_ip.weight.copy_(module.to_k.weight)
                proc.to_v_ip.weight.copy_(module.to_v.weight)
        procs[name] = proc.to(device=module.to_q.weight.device)
    unet.set_attn_processor(dict(procs))
    return nn.ModuleDict({k.replace(".", "/"): v for k, v in procs.items()}), store
