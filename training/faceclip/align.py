"""FaceCLIP alignment pre-training: the joint embedding is pulled towards three spaces.

For each identity-aware pair (reference face, target image of the same person, target caption)
the encoder embeds (reference face, caption); its joint embedding is aligned by the sigmoid
loss (see loss.py) with
- the face space: the frozen face ViT's identity feature of the reference face,
- the text space: the frozen bigG pooled embedding of the plain caption,
- the image space: a frozen CLIP image embedding of the target image (`image_model`: a hub name
  or folder of a `CLIPModel` or a `CLIPVisionModelWithProjection`; None leaves this space out).
Trainable: the encoder's fusers and projections, the three heads and their logit scales and
biases. With `image_branch`, each tower's own logit scale and bias (the released parameters)
also score its ID-injected, projected text feature against that tower's open_clip image branch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.faceclip.config import AlignConfig
from training.faceclip.encoder import FaceCLIPEncoder
from training.faceclip.frozen import HoldsFrozen
from training.faceclip.loss import SpaceAlignment, pair_targets, sigmoid_loss

log = logging.getLogger(__name__)

HEADS = "alignment.safetensors"


def load_image_model(name: str) -> nn.Module:
    """A frozen CLIP vision tower with its projection, from a full CLIPModel checkpoint (only
    its vision side is loaded) or a CLIPVisionModelWithProjection (e.g. an `image_encoder`)."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(name)
    if config.model_type == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return CLIPVisionModelWithProjection.from_pretrained(name, config=vision)
    return CLIPVisionModelWithProjection.from_pretrained(name)


class AlignmentModel(HoldsFrozen):
    def __init__(
        self,
        encoder: FaceCLIPEncoder,
        image_model: nn.Module | None,
        config: AlignConfig | None = None,
        image_branches: list[nn.Module] | None = None,
    ):
        super().__init__()
        self.config = config = config or AlignConfig()
        self.encoder = encoder
        joint = sum(t.width for t in encoder.config.towers)
        init = dict(logit_scale=config.logit_scale, logit_bias=config.logit_bias)
        spaces = {
            "face": (encoder.config.face_vit.features, "positive"),
            "text": (encoder.text_dim, "ignore"),
        }
        if image_model is not None:
            self.hold("image_model", image_model)
            spaces["image"] = (image_model.config.projection_dim, "ignore")
        self.branches = len(image_branches or [])
        if not self.branches:  # only the image branches read the towers' scale and bias
            for tower in encoder.towers:
                tower.logit_scale.requires_grad_(False)
                tower.logit_bias.requires_grad_(False)
        for i, branch in enumerate(image_branches or []):
            self.hold(f"image_branch{i}", branch)
        self.spaces = nn.ModuleDict(
            {name: SpaceAlignment(joint, dim, same, **init) for name, (dim, same) in spaces.items()}
        )

    @torch.no_grad()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        model = self.frozen("image_model")
        size = model.config.image_size
        if pixel_values.shape[-1] != size:
            # The loader's clip_size should match the image model; resize rather than fail.
            pixel_values = F.interpolate(pixel_values, size=(size, size), mode="bicubic")
        return model(pixel_values=pixel_values).image_embeds

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        identities = list(batch["identity"])
        out = self.encoder(batch["ref_face_112"], list(batch["caption"]))
        targets = {"face": out.identity, "text": self.encoder.text_embeds(list(batch["caption"]))}
        if "image" in self.spaces:
            targets["image"] = self.image_embeds(batch["clip_pixel_values"])
        weights = {"face": self.config.face_weight, "text": self.config.text_weight}
        weights["image"] = self.config.image_weight
        losses = {
            name: space(out.joint, targets[name], identities) for name, space in self.spaces.items()
        }
        for i in range(self.branches):  # the released per-tower scale and bias
            tower, tower_out = self.encoder.towers[i], out.towers[i]
            target = self.frozen(f"image_branch{i}")(batch["clip_pixel_values"])
            labels, mask = pair_targets(identities, "ignore", target.device)
            losses[f"tower{i}_image"] = sigmoid_loss(
                tower_out.text_feature, target, tower.logit_scale, tower.logit_bias, labels, mask
            )
            weights[f"tower{i}_image"] = self.config.image_weight
        loss = sum(weights[name] * value for name, value in losses.items())
        logs = {f"loss_{name}": float(value.detach()) for name, value in losses.items()}
        return loss, logs

    def save_pretrained(self, folder: str | Path) -> None:
        """The encoder (folder/encoder) and the alignment heads (folder/alignment.safetensors)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.encoder.save_pretrained(folder / "encoder")
        state = {k: v.detach().contiguous().cpu() for k, v in self.spaces.state_dict().items()}
        save_file(state, str(folder / HEADS))
