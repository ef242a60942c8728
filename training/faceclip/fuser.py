"""The released FaceCLIP fuser: face patch tokens and text tokens refine each other (GroundingDINO's
encoder with its text enhancer and bi-attention fusion; only the text tokens leave it).

Each of `depth` layers runs, in this order:
1. bi-attention: both sides are layer-normed first and the gated updates are added to the
   *normed* inputs (`v = LN(v) + gamma_v * dv`), one similarity matrix softmaxed along each axis;
2. the text enhancer: post-norm self-attention over the text (positions added to queries and
   keys), ReLU feed-forward;
3. the face side: post-norm deformable self-attention over the face grid, ReLU feed-forward.
So the text leaving layer i has read the face as layer i-1 left it; the last deformable layer
never reaches the output, yet it is part of the released weights (as are `enc_output` and
`enc_output_norm`, kept so a released checkpoint loads and writes back strictly).
Attribute names follow the released state dict (`encoder.layers`, `encoder.text_layers`,
`encoder.fusion_layers`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.faceclip.config import FuserConfig
from training.faceclip.deform_attn import MultiScaleDeformableAttention, reference_points

CLAMP = 50000.0  # the release clamps attention logits to stay finite in half precision


class BiAttention(nn.Module):
    """One logit matrix between face (v) and text (l) tokens, per head; text reads the face
    through its transpose."""

    def __init__(self, dim: int, embed_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.scale = (embed_dim // heads) ** -0.5
        self.v_proj = nn.Linear(dim, embed_dim)
        self.l_proj = nn.Linear(dim, embed_dim)
        self.values_v_proj = nn.Linear(dim, embed_dim)
        self.values_l_proj = nn.Linear(dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, dim)
        self.out_l_proj = nn.Linear(embed_dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, v: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._split(self.v_proj(v) * self.scale)
        k = self._split(self.l_proj(text))
        logits = q @ k.transpose(-1, -2)  # (B, heads, faces, texts)
        # Shift by the global maximum (the whole batch's, as released), then clamp.
        logits = (logits - logits.max()).clamp(-CLAMP, CLAMP)
        logits_t = logits.transpose(-1, -2)
        logits_t = (logits_t - logits_t.max(-1, keepdim=True)[0]).clamp(-CLAMP, CLAMP)
        p_v = F.dropout(logits.softmax(-1), self.dropout, self.training)
        p_l = F.dropout(logits_t.softmax(-1), self.dropout, self.training)
        dv = self.out_v_proj(self._merge(p_v @ self._split(self.values_l_proj(text))))
        dl = self.out_l_proj(self._merge(p_l @ self._split(self.values_v_proj(v))))
        return dv, dl


class BiAttentionBlock(nn.Module):
    def __init__(self, dim: int, config: FuserConfig):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(dim)
        self.layer_norm_l = nn.LayerNorm(dim)
        self.attn = BiAttention(dim, config.ffn // 2, config.heads // 2, config.fusion_dropout)
        self.gamma_v = nn.Parameter(torch.full((dim,), config.layer_scale))
        self.gamma_l = nn.Parameter(torch.full((dim,), config.layer_scale))

    def forward(self, v: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, text = self.layer_norm_v(v), self.layer_norm_l(text)
        dv, dl = self.attn(v, text)
        return v + self.gamma_v * dv, text + self.gamma_l * dl


class TextEnhancerLayer(nn.Module):
    def __init__(self, dim: int, config: FuserConfig):
        super().__init__()
        p = config.text_dropout
        self.self_attn = nn.MultiheadAttention(dim, config.heads // 2, dropout=p)
        self.linear1 = nn.Linear(dim, config.ffn // 2)
        self.linear2 = nn.Linear(config.ffn // 2, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop, self.drop1, self.drop2 = nn.Dropout(p), nn.Dropout(p), nn.Dropout(p)

    def forward(self, text: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = text.transpose(0, 1)  # nn.MultiheadAttention here is sequence-first
        qk = x + pos.transpose(0, 1)
        x = self.norm1(x + self.drop1(self.self_attn(qk, qk, x, need_weights=False)[0]))
        x = self.norm2(x + self.drop2(self.linear2(self.drop(F.relu(self.linear1(x))))))
        return x.transpose(0, 1)


class DeformableLayer(nn.Module):
    def __init__(self, dim: int, config: FuserConfig):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, config.heads, 1, config.points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, config.ffn)
        self.linear2 = nn.Linear(config.ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, face, pos, reference, shapes) -> torch.Tensor:
        face = self.norm1(face + self.self_attn(face + pos, face, reference, shapes))
        return self.norm2(face + self.linear2(F.relu(self.linear1(face))))


class FuserEncoder(nn.Module):
    def __init__(self, dim: int, config: FuserConfig):
        super().__init__()
        n = config.depth
        self.layers = nn.ModuleList(DeformableLayer(dim, config) for _ in range(n))
        self.text_layers = nn.ModuleList(TextEnhancerLayer(dim, config) for _ in range(n))
        self.fusion_layers = nn.ModuleList(BiAttentionBlock(dim, config) for _ in range(n))


class TextFaceFuser(nn.Module):
    def __init__(self, dim: int, config: FuserConfig):
        super().__init__()
        self.encoder = FuserEncoder(dim, config)
        self.enc_output = nn.Linear(dim, dim)  # released, unused by its forward
        self.enc_output_norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's init: Xavier for every matrix, then Deformable DETR's own."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()

    def forward(
        self,
        text: torch.Tensor,
        text_pos: torch.Tensor,
        face: torch.Tensor,
        face_pos: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """text, text_pos (B, T, dim); face, face_pos (B, h*w, dim) -> fused text (B, T, dim)."""
        shapes = [grid]
        reference = reference_points(shapes, face.device).to(face.dtype)
        enc = self.encoder
        last = len(enc.layers) - 1
        pairs = zip(enc.fusion_layers, enc.text_layers, strict=True)
        for i, (fusion, text_layer) in enumerate(pairs):
            face, text = fusion(face, text)
            text = text_layer(text, text_pos)
            if i < last:  # the last face update reaches nothing that leaves the fuser
                face = enc.layers[i](face, face_pos, reference, shapes)
        return text

    def unused(self) -> list[nn.Module]:
        """Released modules the output does not depend on: frozen in training (DDP needs
        every trainable parameter to get a gradient)."""
        return [self.encoder.layers[-1], self.enc_output, self.enc_output_norm]
