"""ConsistentID's objective: noise MSE (optionally foreground only) and the facial attention
localisation loss.

Where the localisation loss reads attention: cross-attention, as the paper defines it.
A region's `<|facial|>` token carries that region's image features into the text sequence; its
cross-attention map says where in the image those features are written, so pulling the map inside
the region's mask is the point of the loss. The public reference trainer instead patches
`get_attention_scores` of the *self*-attention modules (`attn1`) of the five central blocks. There
the keys are image positions, not text tokens, so gathering column `idx` (a text position) measures
how strongly every pixel attends to latent pixel number `idx`, somewhere in the top rows of the
image, which has nothing to do with the region token. The hook also only fires when xformers is
absent (its LoRA processor calls `get_attention_scores` only then; its cross-attention processor
uses SDPA and never calls it). So the maps here are the softmax over the text tokens of each
localisation layer's cross-attention (the ID tokens are attended separately and are not part of
that softmax), gathered at the region-token columns (see attention.IDAttnProcessor).

Like the reference loss, each map can be scaled by its peak first (`normalize`), which makes the
term independent of how much of the 77-token softmax the token receives overall: the loss shapes
where a region token looks, not how loud it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _masks_at(masks: torch.Tensor, latent_hw: tuple[int, int], tokens: int) -> torch.Tensor:
    """Region masks (B, K, H, W) resampled to a layer with `tokens` positions, as (B, K, tokens)."""
    h, w = latent_hw
    factor = math.sqrt(h * w / tokens)
    size = (round(h / factor), round(w / factor))
    if size[0] * size[1] != tokens:
        raise ValueError(f"a layer of {tokens} positions does not tile a {h}x{w} latent")
    resized = F.interpolate(masks.float(), size=size, mode="bilinear", antialias=True)
    return resized.flatten(2)


def localization_loss(
    maps: list[torch.Tensor],
    masks: torch.Tensor,
    valid: torch.Tensor,
    latent_hw: tuple[int, int],
    normalize: bool = True,
) -> torch.Tensor:
    """Mean attention outside each region's mask minus mean attention inside it.

    maps: per layer (B, heads, N, K) attention probabilities of the K region tokens over N image
    positions; masks: (B, K, H, W) in [0, 1] at any resolution with the latent's aspect;
    valid: (B, K) bool, the region has a token in the prompt. Averaged over heads, over valid
    (sample, region) pairs, then over layers. Lower is better; it lies in [-1, 1]."""
    if not maps:
        raise ValueError("no attention maps were recorded")
    weight = valid.float()
    count = weight.sum().clamp(min=1.0)
    resized: dict[int, torch.Tensor] = {}
    total = maps[0].new_zeros((), dtype=torch.float32)
    for probs in maps:
        n = probs.shape[2]
        if n not in resized:
            resized[n] = _masks_at(masks, latent_hw, n).transpose(1, 2)[:, None]  # (B, 1, N, K)
        inside_mask = resized[n]
        outside_mask = 1.0 - inside_mask
        p = probs.float()
        if normalize:
            p = p / (p.amax(dim=2, keepdim=True) + 1e-5)
        inside = (p * inside_mask).sum(2) / (inside_mask.sum(2) + 1e-5)
        outside = (p * outside_mask).sum(2) / (outside_mask.sum(2) + 1e-5)
        per_region = (outside - inside).mean(1)  # (B, K), heads averaged
        total = total + (per_region * weight).sum() / count
    return total / len(maps)


def noise_loss(
    pred: torch.Tensor, target: torch.Tensor, foreground: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """MSE between predicted and true noise; samples with `masked` (B,) set count only their
    foreground (B, 1, H, W) pixels, resampled to the latent. Like the reference, the mean runs
    over every latent element, so a masked sample weighs in proportion to its foreground area."""
    mask = F.interpolate(foreground.float(), size=pred.shape[-2:], mode="bilinear")
    weight = torch.where(masked[:, None, None, None], mask, torch.ones_like(mask))
    return ((pred.float() - target.float()).pow(2) * weight).mean()
