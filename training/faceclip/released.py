"""One FaceCLIP tower as released (`TextImageBranch` of `face_clip_l_14` / `face_clip_g_14`).

Per tower: an open_clip text transformer (frozen), a face ViT (frozen), the identity projection
`proj1`, projections of the face patches and positions and of the text states and positions
into the tower's width, the fuser, and a logit scale and bias of its own. The forward is the
release's:
    id = f / |f|, f the face ViT's identity feature; the `id` word's token embedding is replaced
    by proj1(id); + positions; causal transformer; ln_final -> states (the LAST layer);
    pooled = states at the end token (before the text projection: what SDXL gets);
    fused = fuser(text_embed_proj(states), text_pos_proj(positions),
                  face_patch_proj(patches), face_pos_proj(face ViT pos_embed)).
Attribute names are the released ones, so a tower's state dict is the release's minus its
prefix. `ImageBranch` is the release's frozen open_clip image tower of the same CLIP model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.faceclip.config import FaceViTConfig, FuserConfig, TowerConfig
from training.faceclip.face_vit import FaceViT
from training.faceclip.fuser import TextFaceFuser


@dataclass
class TowerOutput:
    fused: torch.Tensor  # (B, T, width)
    pooled: torch.Tensor  # (B, width): ln_final state at the end token
    text_feature: torch.Tensor  # (B, embed_dim): pooled @ text_projection
    identity: torch.Tensor  # (B, features): the L2-normalised face identity feature


def open_clip_config(config: TowerConfig, part: str) -> dict:
    """open_clip's `text_cfg` / `vision_cfg` for a released tower; the given sizes otherwise."""
    import open_clip

    known = open_clip.get_model_config(config.model_name)
    if known is not None:
        return known[part]
    if part == "text_cfg":
        return config.text_cfg()
    return {"image_size": 32, "layers": 1, "width": config.width, "patch_size": 8, "head_width": 16}


class FaceCLIPTower(nn.Module):
    FROZEN = ("transformer", "token_embedding", "ln_final", "face_encoder")
    FROZEN_STATE = (*FROZEN, "positional_embedding", "text_projection")

    def __init__(self, config: TowerConfig, face: FaceViTConfig, fuser: FuserConfig):
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower

        self.config, self.grid = config, (face.grid, face.grid)
        text_cfg = CLIPTextCfg(**open_clip_config(config, "text_cfg"))
        text = _build_text_tower(config.embed_dim, text_cfg, config.quick_gelu)
        self.transformer = text.transformer
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(config.init_logit_bias))
        self.face_encoder = FaceViT(face)
        width = config.width
        self.proj1 = nn.Linear(face.features, width)
        self.face_patch_proj = nn.Linear(face.width, width)
        self.face_pos_proj = nn.Linear(face.width, width)
        self.text_embed_proj = nn.Linear(width, width)
        self.text_pos_proj = nn.Linear(width, width)
        self.fuser = TextFaceFuser(width, fuser)

    def freeze(self) -> FaceCLIPTower:
        """The released training freezes the text tower and the face ViT; the fuser's
        unreachable modules are frozen too."""
        for name in self.FROZEN:
            getattr(self, name).requires_grad_(False)
        self.positional_embedding.requires_grad_(False)
        self.text_projection.requires_grad_(False)
        for module in self.fuser.unused():
            module.requires_grad_(False)
        self.face_encoder.eval()
        return self

    def train(self, mode: bool = True) -> FaceCLIPTower:
        super().train(mode)
        self.face_encoder.eval()  # BatchNorm statistics of a frozen recogniser stay fixed
        return self

    def encode_text(self, ids: torch.Tensor, id_mask: torch.Tensor | None, id_token=None):
        """Last-layer states (B, T, width) with `id_token` (B, width) in place of the masked
        token embeddings (one per row at most)."""
        x = self.token_embedding(ids)
        if id_mask is not None and id_token is not None:
            x = torch.where(id_mask[..., None], id_token[:, None, :].to(x.dtype), x)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        return self.ln_final(x)

    def pool(self, states: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, projected): the end token is the highest id of each row."""
        pooled = states[torch.arange(len(ids), device=ids.device), ids.argmax(-1)]
        return pooled, pooled @ self.text_projection.to(pooled.dtype)

    def forward(self, faces: torch.Tensor, ids: torch.Tensor, id_mask: torch.Tensor) -> TowerOutput:
        """faces (B, 3, H, W) as the face ViT expects them; ids, id_mask (B, T)."""
        face = self.face_encoder(faces)
        identity = face.identity / face.identity.norm(dim=-1, keepdim=True)
        states = self.encode_text(ids, id_mask, self.proj1(identity))
        pooled, projected = self.pool(states, ids)
        b = len(ids)
        text = self.text_embed_proj(states)
        text_pos = self.text_pos_proj(self.positional_embedding.to(text.dtype))
        patches = self.face_patch_proj(face.patches.to(text.dtype))
        face_pos = self.face_pos_proj(self.face_encoder.pos_embed.to(text.dtype))
        fused = self.fuser(
            text,
            text_pos[None].expand(b, -1, -1),
            patches,
            face_pos.expand(b, -1, -1),
            self.grid,
        )
        return TowerOutput(fused, pooled, projected, identity)


class ImageBranch(nn.Module):
    """The release's frozen image tower: open_clip's vision transformer of the tower's CLIP
    model (MetaCLIP weights), embedding target images into that tower's joint space."""

    def __init__(self, config: TowerConfig, load_pretrained: bool = True):
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        vision_cfg = CLIPVisionCfg(**open_clip_config(config, "vision_cfg"))
        self.vision = _build_vision_tower(config.embed_dim, vision_cfg, config.quick_gelu)
        self.image_size = vision_cfg.image_size
        if load_pretrained and config.pretrained:
            import open_clip

            model = open_clip.create_model(config.model_name, pretrained=config.pretrained)
            self.vision.load_state_dict(model.visual.state_dict(), strict=True)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ImageBranch:
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images (B, 3, s, s), resized to the tower's input if needed."""
        if pixels.shape[-1] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size,) * 2, mode="bicubic")
        return self.vision(pixels)
