"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch, sampled with grid_sample.

Each query predicts, per head, level and point, an offset from its reference point (in cells of
that level) and a weight (softmax over levels x points); the output is the weighted sum of the
bilinearly sampled values (zeros outside the map, pixel centres at half-integers). Parameter
names and initialisation are Deformable DETR's, so released weights load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_points(shapes: list[tuple[int, int]], device=None) -> torch.Tensor:
    """(N, levels, 2) normalised (x, y) centres of every cell of every level (valid ratios 1)."""
    points = []
    for h, w in shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
    ref = torch.cat(points, 0)
    return ref[:, None, :].expand(-1, len(shapes), -1)


def deformable_sample(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """value (B, N, heads, d); locations (B, Q, heads, levels, points, 2) in [0, 1];
    weights (B, Q, heads, levels, points) -> (B, Q, heads * d)."""
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1] with align_corners=False
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = per_level[level].permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(b * heads, q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # fmt: skip
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*heads, d, Q, levels*points)
    w = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (stacked * w).sum(-1).view(b, heads * d, q)
    return out.transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    def __init__(self, dim: int, heads: int, levels: int = 1, points: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as rings around the reference, one direction per head, radius = point.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        reference: torch.Tensor,
        shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """query (B, Q, dim), value (B, N, dim), reference (Q, levels, 2) -> (B, Q, dim)."""
        b, q, _ = query.shape
        v = self.value_proj(value).view(b, value.shape[1], self.heads, -1)
        offsets = self.sampling_offsets(query).view(b, q, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(b, q, self.heads, -1).softmax(-1)
        weights = weights.view(b, q, self.heads, self.levels, self.points)
        # Offsets are in cells of each level: divide by (w, h) to get normalised coordinates.
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference[None, :, None, :, None, :] + offsets / norm[None, None, None, :, None]
        out = deformable_sample(v, shapes, locations.to(v.dtype), weights.to(v.dtype))
        return self.output_proj(out)
