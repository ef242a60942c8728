"""FaceCLIP-SDXL: the whole SDXL UNet fine-tuned on FaceCLIP's outputs.

The pre-trained FaceCLIP encoder (frozen here, as in the released model) turns (reference face,
caption) into the UNet's `encoder_hidden_states` (B, 77, 2048) and `text_embeds` (B, 1280);
SDXL's micro-conditioning `time_ids` are (original h, w, crop top, left, target h, w). The loss
is the MSE between the UNet output and the noise (or the velocity for v-prediction schedulers).
With probability `condition_drop` (0.1) a sample is trained as the classifier-free negative:
an all-zero face image, an empty caption, no `Photo of a id person.` prefix and no injection,
which is exactly what the generator feeds the negative branch at inference.
Only the UNet is a parameter of this module; the VAE and the encoder are frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from training.faceclip.config import EncoderConfig
from training.faceclip.encoder import FaceCLIPEncoder, FaceCLIPOutput
from training.faceclip.frozen import HoldsFrozen

log = logging.getLogger(__name__)


def time_ids(original_size, crop_top_left, target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's added time ids (B, 6) from (B, 2) original sizes and crop offsets."""
    target = torch.tensor(target_size, device=original_size.device).expand_as(original_size)
    return torch.cat([original_size, crop_top_left, target], dim=-1).float()


def condition(
    encoder: FaceCLIPEncoder, faces: torch.Tensor, prompts: list[str], keep: torch.Tensor
) -> FaceCLIPOutput:
    """FaceCLIP conditioning where `keep` (B,) bool; the negative (zero face, empty prompt,
    no identity) elsewhere."""
    faces = torch.where(keep[:, None, None, None], faces, torch.zeros_like(faces))
    kept = keep.tolist()
    prompts = [p if k else "" for p, k in zip(prompts, kept, strict=True)]
    return encoder(faces, prompts, with_identity=kept)


def load_released_unet(unet, release: str | Path) -> bool:
    """The release's fine-tuned UNet (`unet.pt`, a diffusers SDXL UNet state dict), strictly;
    False when the release has none (the base UNet stays)."""
    from training.faceclip.convert import read_release, release_files

    _, path = release_files(release)
    if path is None:
        log.warning("%s has no unet.pt: starting from the base model's UNet", release)
        return False
    unet.load_state_dict(read_release(path), strict=True)
    return True


class FaceCLIPSDXL(HoldsFrozen):
    def __init__(self, unet, vae, encoder: FaceCLIPEncoder, scheduler, condition_drop: float = 0.1):
        super().__init__()
        self.unet = unet
        self.hold("vae", vae)
        self.hold("encoder", encoder)
        self.scheduler = scheduler
        self.condition_drop = condition_drop

    @property
    def encoder(self) -> FaceCLIPEncoder:
        return self.frozen("encoder")

    @classmethod
    def build(
        cls,
        base_model: str,
        encoder_weights: str | Path | EncoderConfig,
        condition_drop: float = 0.1,
        face_encoder: str | None = None,
        unet_from_reference: str | Path | None = None,
    ) -> FaceCLIPSDXL:
        """VAE and noise schedule from the SDXL `base_model`; the encoder exported by the
        alignment stage (or built from a config, e.g. one initialised from the release); the
        UNet from `base_model`, or from the release's `unet.pt` when one is found."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        if isinstance(encoder_weights, EncoderConfig):
            encoder = FaceCLIPEncoder.build(encoder_weights)
        else:
            encoder = FaceCLIPEncoder.from_pretrained(encoder_weights, face_encoder=face_encoder)
        unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
        if unet_from_reference:
            load_released_unet(unet, unet_from_reference)
        return cls(
            unet,
            AutoencoderKL.from_pretrained(base_model, subfolder="vae"),
            encoder,
            DDPMScheduler.from_pretrained(base_model, subfolder="scheduler"),
            condition_drop,
        )

    @torch.no_grad()
    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vae = self.frozen("vae")
        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = batch["pixel_values"]
        b = len(pixels)
        latents = self.latents(pixels).float()
        keep = torch.rand(b, device=pixels.device) >= self.condition_drop
        with torch.no_grad():
            cond = condition(self.encoder, batch["ref_face_112"], list(batch["caption"]), keep)
        noise = torch.randn_like(latents)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        added = {
            "text_embeds": cond.pooled,
            "time_ids": time_ids(batch["original_size"], batch["crop_top_left"], pixels.shape[-2:]),
        }
        pred = self.unet(noisy, t, cond.tokens, added_cond_kwargs=added).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"dropped": float((~keep).float().mean())}

    def save_pretrained(self, folder: str | Path) -> None:
        """The fine-tuned UNet (folder/unet, diffusers layout) and the encoder (folder/encoder)."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        self.encoder.save_pretrained(folder / "encoder")
