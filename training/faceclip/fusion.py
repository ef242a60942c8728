"""The fusion module: face patch tokens and text tokens refine each other in stacked blocks.

One `TowerFusion` per text tower works at that tower's width (768 for CLIP-L, 1280 for bigG), as
the released encoder does. A block is: self-attention over the face patch tokens, a dual
(bidirectional) cross-attention in which one face-text similarity matrix is softmaxed along
each axis so face tokens read text and text tokens read the face (GroundingDINO's fusion), then
self-attention over the text tokens. Layers are pre-norm with residuals, and the text enters
through an identity-initialised projection, so the fused tokens start on the text tower's scale;
the cross-attention updates start small (layer scale), as in GroundingDINO, so the face is
blended in gradually. Positions are added to queries and keys. The released encoder uses
deformable attention on the face grid; with a single 12x12 level plain self-attention sees
every patch and needs no custom kernels.

Only text tokens leave the module, so the last block skips the face-side updates that nothing
would read (unused parameters also break DDP).
"""

from __future__ import annotations

import torch
from torch import nn

from training.faceclip.config import FaceViTConfig, FusionConfig


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttentionLayer(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.norm1(x)
        qk = h + pos
        x = x + self.attn(qk, qk, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


class DualCrossAttention(nn.Module):
    """Face <-> text attention through one shared similarity matrix."""

    def __init__(self, width: int, dim: int, heads: int, layer_scale: float, update_face: bool):
        super().__init__()
        self.heads = heads
        self.norm_face = nn.LayerNorm(width)
        self.norm_text = nn.LayerNorm(width)
        self.q_face = nn.Linear(width, dim)
        self.k_text = nn.Linear(width, dim)
        self.v_face = nn.Linear(width, dim)  # what text tokens read
        self.out_text = nn.Linear(dim, width)
        self.gamma_text = nn.Parameter(torch.full((width,), layer_scale))
        self.update_face = update_face
        if update_face:
            self.v_text = nn.Linear(width, dim)  # what face tokens read
            self.out_face = nn.Linear(dim, width)
            self.gamma_face = nn.Parameter(torch.full((width,), layer_scale))

    def forward(
        self,
        face: torch.Tensor,
        text: torch.Tensor,
        face_pos: torch.Tensor,
        text_pos: torch.Tensor,
        text_padding: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f, t = self.norm_face(face), self.norm_text(text)
        q = _heads(self.q_face(f + face_pos), self.heads)
        k = _heads(self.k_text(t + text_pos), self.heads)
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, faces, texts)
        # Along the face axis for the text side: every face token is valid.
        text_read = logits.transpose(-1, -2).softmax(-1) @ _heads(self.v_face(f), self.heads)
        new_text = text + self.gamma_text * self.out_text(_merge(text_read))
        if self.update_face:
            if text_padding is not None:
                logits = logits.masked_fill(text_padding[:, None, None, :], float("-inf"))
            face_read = logits.softmax(-1) @ _heads(self.v_text(t), self.heads)
            face = face + self.gamma_face * self.out_face(_merge(face_read))
        return face, new_text


class FusionBlock(nn.Module):
    def __init__(self, width: int, config: FusionConfig, last: bool):
        super().__init__()
        c = config
        self.face_attn = SelfAttentionLayer(width, c.face_heads, c.face_ffn)
        self.cross = DualCrossAttention(
            width, c.cross_dim, c.cross_heads, c.layer_scale, update_face=not last
        )
        self.text_attn = SelfAttentionLayer(width, c.text_heads, c.text_ffn)

    def forward(self, face, text, face_pos, text_pos, text_padding):
        face = self.face_attn(face, face_pos)
        face, text = self.cross(face, text, face_pos, text_pos, text_padding)
        text = self.text_attn(text, text_pos, text_padding)
        return face, text


class TowerFusion(nn.Module):
    """The trainable part of FaceCLIP for one text tower: the identity projection that replaces
    the `id` token's input embedding, the projections into the tower's width, the blocks."""

    def __init__(self, text_width: int, face: FaceViTConfig, config: FusionConfig):
        super().__init__()
        self.id_proj = nn.Linear(face.features, text_width)
        self.text_in = nn.Linear(text_width, text_width)
        self.text_pos = nn.Linear(text_width, text_width)
        self.face_in = nn.Linear(face.width, text_width)
        self.face_pos = nn.Linear(face.width, text_width)
        self.blocks = nn.ModuleList(
            FusionBlock(text_width, config, last=i == config.depth - 1) for i in range(config.depth)
        )
        # Start from the text tower's own states: the UNet is trained on them.
        nn.init.eye_(self.text_in.weight)
        nn.init.zeros_(self.text_in.bias)

    def forward(
        self,
        text: torch.Tensor,
        text_pos: torch.Tensor,
        text_padding: torch.Tensor | None,
        patches: torch.Tensor,
        face_pos: torch.Tensor,
    ) -> torch.Tensor:
        """text (B, T, width), text_pos (T, width), text_padding (B, T) True at padding,
        patches (B, N, face width), face_pos (1, N, face width) -> fused text (B, T, width)."""
        text = self.text_in(text)
        text_pos = self.text_pos(text_pos).unsqueeze(0)
        face = self.face_in(patches)
        face_pos = self.face_pos(face_pos)
        for block in self.blocks:
            face, text = block(face, text, face_pos, text_pos, text_padding)
        return text
