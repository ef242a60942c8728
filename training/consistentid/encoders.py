"""ConsistentID's two image-side encoders: the ID projection (ID embedding -> ID tokens refined
over CLIP patch features) and the facial encoder (one token per region image, fused into the
text sequence at that region's position)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttention(nn.Module):
    """Latents attend to [features; latents] (the Flamingo/IP-Adapter perceiver step)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_x, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm_x(x), self.norm_latents(latents)
        b = latents.shape[0]
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """Refines a few latent tokens by attending over a long sequence of image features."""

    def __init__(self, dim: int, in_dim: int, out_dim: int, depth: int, dim_head: int):
        super().__init__()
        heads = max(1, dim // dim_head)
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class IDProjection(nn.Module):
    """IP-Adapter-FaceID-Plus style: the ID embedding -> `num_tokens` tokens of the text width,
    refined by a perceiver over the whole face's CLIP patch features."""

    def __init__(
        self, id_dim: int, clip_dim: int, width: int, num_tokens: int, depth: int, dim_head: int
    ):
        super().__init__()
        self.num_tokens, self.width = num_tokens, width
        self.mlp = nn.Sequential(
            nn.Linear(id_dim, 2 * id_dim), nn.GELU(), nn.Linear(2 * id_dim, width * num_tokens)
        )
        self.norm = nn.LayerNorm(width)
        self.resampler = Resampler(width, clip_dim, width, depth, dim_head)

    def forward(
        self, id_embeds: torch.Tensor, face_patches: torch.Tensor, shortcut: bool = False
    ) -> torch.Tensor:
        """`shortcut`: the refined tokens added to the unrefined ones (the reference's SDXL
        pipeline generates this way; it trains and runs SD 1.5 without)."""
        tokens = self.norm(self.mlp(id_embeds).view(-1, self.num_tokens, self.width))
        refined = self.resampler(tokens, face_patches)
        return tokens + refined if shortcut else refined


class MLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x) if self.residual else self.net(x)


class FacialEncoder(nn.Module):
    """Region images -> one token each (a perceiver with one latent), each fused with the text
    embedding at its position by two MLPs: the released model's facial encoder.

    `align=True` adds what the release lacks: the whole face as a sixth token, a learned `slot`
    per role (face, each region) and a transformer layer in which the region tokens attend to
    the face and to each other before fusion."""

    def __init__(
        self,
        clip_dim: int,
        width: int,
        dim: int,
        depth: int,
        dim_head: int,
        num_regions: int = 5,
        align: bool = False,
    ):
        super().__init__()
        self.aligned = align
        self.latent = nn.Parameter(torch.randn(1, 1, dim) / dim**0.5)
        self.resampler = Resampler(dim, clip_dim, width, depth, dim_head)
        if align:
            self.slot = nn.Parameter(torch.zeros(1 + num_regions, width))
            self.align = nn.TransformerEncoderLayer(
                width,
                max(1, width // dim_head),
                dim_feedforward=4 * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
        self.fuse_in = MLP(2 * width, width, residual=False)
        self.fuse_out = MLP(width, width, residual=True)
        self.norm = nn.LayerNorm(width)

    def encode(
        self, face_patches: torch.Tensor, region_patches: torch.Tensor, region_valid: torch.Tensor
    ) -> torch.Tensor:
        """face_patches (B, P, C), region_patches (B, K, P, C), region_valid (B, K) -> (B, K, W).
        Invalid regions are never fused: their outputs are left at zero (or, aligned, ignored as
        keys), and without alignment they are not computed at all."""
        if not self.aligned:
            out = region_patches.new_zeros(*region_valid.shape, self.norm.normalized_shape[0])
            if region_valid.any():
                valid = region_patches[region_valid]
                tokens = self.resampler(self.latent.expand(len(valid), -1, -1), valid)[:, 0]
                out = out.index_put((region_valid,), tokens.to(out.dtype))
            return out
        b, k = region_valid.shape
        images = torch.cat([face_patches[:, None], region_patches], dim=1).flatten(0, 1)
        tokens = self.resampler(self.latent.expand(images.shape[0], -1, -1), images)
        tokens = tokens.view(b, 1 + k, -1) + self.slot.to(tokens.dtype)
        ignore = torch.cat([region_valid.new_zeros(b, 1), ~region_valid], dim=1)
        return self.align(tokens, src_key_padding_mask=ignore)[:, 1:]

    def fuse(
        self, text: torch.Tensor, regions: torch.Tensor, token_index: torch.Tensor
    ) -> torch.Tensor:
        """Text (B, L, W) with the fused region features at token_index (B, K); -1: none."""
        rows, cols = (token_index >= 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return text
        positions = token_index[rows, cols]
        at_token = text[rows, positions]
        fused = self.fuse_in(torch.cat([at_token, regions[rows, cols].to(text.dtype)], dim=-1))
        fused = self.norm(self.fuse_out(fused + at_token))
        return text.index_put((rows, positions), fused.to(text.dtype))
