"""ConsistentID (spec §5): frozen Stable Diffusion + CLIP image encoder, trainable ID projection,
facial encoder and attention processors; one training step as `forward(batch)`.

Only the trainable parts are registered submodules, so `state_dict()` (checkpoints, export) holds
just them; the frozen models live in `self.frozen` and follow the module's device moves. With the
default options they are the released model's tensors under other names
(training/consistentid/convert.py maps them both ways).

Text: by default the released model's path (training/consistentid/prompt.py): `<|facial|>` only
marks the region words and is removed before the text encoder, whose hidden state at each region
word is replaced. With `keep_facial_token` the marker stays as a token of its own and its hidden
state is replaced; its input embedding stays frozen at the mean of the vocabulary's rows (set
deterministically, so training and inference build the same text encoder from the same base). A
trainable row would cost a backward pass through the whole text encoder every step and, through
causal attention, move the embedding of every token after the marker in every prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.consistentid.attention import central_blocks, install_processors
from training.consistentid.config import LossOptions, ModelOptions
from training.consistentid.encoders import FacialEncoder, IDProjection
from training.consistentid.loss import localization_loss, noise_loss

log = logging.getLogger(__name__)


@dataclass
class Frozen:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    image_encoder: nn.Module
    tokenizer: object
    scheduler: object  # the base model's training noise scheduler
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    def modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.text_encoder, self.image_encoder]


def load_text(base_model: str, dtype: torch.dtype = torch.float32):
    """Tokenizer with `<|facial|>` added and the text encoder resized to match."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from training.text import add_facial_token

    tokenizer = CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer")
    add_facial_token(tokenizer)
    text_encoder = CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", dtype=dtype)
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[rows:] = table[:rows].float().mean(0)
    return tokenizer, text_encoder


# Spec §5: CLIP ViT-H/14. SD 1.5's own repository ships no image encoder.
VIT_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def image_encoder_source(base_model: str, image_encoder: str | None) -> tuple[str, bool]:
    """(source, nested): `image_encoder` if given; else the base model folder's image_encoder/
    when it has one (an IP-Adapter-style folder); else ViT-H/14 from the hub."""
    if image_encoder:
        return image_encoder, Path(image_encoder, "image_encoder").is_dir()
    if Path(base_model, "image_encoder").is_dir():
        return base_model, True
    return VIT_H, False


def load_image_encoder(
    base_model: str, image_encoder: str | None = None, dtype: torch.dtype = torch.float32
):
    """CLIP vision tower and its preprocessing (mean, std), from `image_encoder_source`."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    source, nested = image_encoder_source(base_model, image_encoder)
    model = CLIPVisionModelWithProjection.from_pretrained(
        source, subfolder="image_encoder" if nested else "", dtype=dtype
    )
    try:
        processor = CLIPImageProcessor.from_pretrained(
            source, subfolder="feature_extractor" if nested else ""
        )
    except (OSError, ValueError):
        log.info("no image processor config at %s: CLIP's default mean and std", source)
        processor = CLIPImageProcessor()
    return model, tuple(processor.image_mean), tuple(processor.image_std)


def load_frozen(
    base_model: str, image_encoder: str | None = None, dtype: torch.dtype | None = None
) -> Frozen:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    dtype = dtype or torch.float32
    tokenizer, text_encoder = load_text(base_model, dtype)
    vision, mean, std = load_image_encoder(base_model, image_encoder, dtype)
    frozen = Frozen(
        unet=UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", torch_dtype=dtype),
        vae=AutoencoderKL.from_pretrained(base_model, subfolder="vae", torch_dtype=dtype),
        text_encoder=text_encoder,
        image_encoder=vision,
        tokenizer=tokenizer,
        scheduler=DDPMScheduler.from_pretrained(base_model, subfolder="scheduler"),
        image_mean=mean,
        image_std=std,
    )
    for module in frozen.modules():
        module.requires_grad_(False).eval()
    return frozen


class ConsistentID(nn.Module):
    frozen_loader = staticmethod(load_frozen)  # (base_model, image_encoder, dtype) -> Frozen

    def __init__(
        self,
        frozen: Frozen,
        id_dim: int,
        options: ModelOptions | None = None,
        loss: LossOptions | None = None,
    ):
        super().__init__()
        self.options, self.loss_options = options or ModelOptions(), loss or LossOptions()
        self.frozen = frozen
        opts = self.options
        unet, vision = frozen.unet, frozen.image_encoder.config
        width = unet.config.cross_attention_dim
        self.id_dim = id_dim
        self.id_projection = IDProjection(
            id_dim, vision.hidden_size, width, opts.num_id_tokens, opts.id_depth, opts.dim_head
        )
        self.facial_encoder = FacialEncoder(
            vision.hidden_size,
            width,
            opts.facial_dim or vision.projection_dim,
            opts.facial_depth,
            opts.dim_head,
            align=opts.facial_align,
        )
        self.localization_blocks = opts.localization_blocks or central_blocks(
            unet, opts.localization_layers
        )
        self.adapters, self.store = install_processors(
            unet, opts.lora_rank, opts.num_id_tokens, opts.ip_scale, self.localization_blocks
        )
        self.initialised_from_clip = self._init_from_clip_projection()
        empty = frozen.tokenizer("", padding="max_length", max_length=77, truncation=True)
        self.register_buffer("empty_ids", torch.tensor(empty.input_ids), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        base_model: str,
        id_dim: int,
        image_encoder: str | None = None,
        options: ModelOptions | None = None,
        loss: LossOptions | None = None,
        frozen_dtype: torch.dtype | None = None,
    ) -> ConsistentID:
        frozen = cls.frozen_loader(base_model, image_encoder, frozen_dtype)
        return cls(frozen, id_dim, options, loss)

    def _init_from_clip_projection(self) -> list[str]:
        """Start each perceiver's input layer (CLIP width -> perceiver width) from CLIP's own image
        projection where the shapes agree (ViT-H/14: 1280 -> 1024, the facial perceiver's width)."""
        weight = self.frozen.image_encoder.visual_projection.weight
        done = []
        for name in ("id_projection.resampler.proj_in", "facial_encoder.resampler.proj_in"):
            layer = self.get_submodule(name)
            if layer.weight.shape == weight.shape:
                with torch.no_grad():
                    layer.weight.copy_(weight.float())
                    layer.bias.zero_()
                done.append(name)
        log.info("initialised from CLIP's image projection: %s", done or "none (shapes differ)")
        return done

    def processor_names(self) -> list[str]:
        """The attention layers holding the adapters, in the UNet's processor order."""
        return [key.replace("/", ".").removesuffix(".processor") for key in self.adapters]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for module in self.frozen.modules():
            module._apply(fn, recurse)
        return self

    # -- conditioning ----------------------------------------------------------------------------

    @torch.no_grad()
    def clip_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP `hidden_states[-2]` patch features (N, P, C) of CLIP-normalised images."""
        encoder = self.frozen.image_encoder
        out = encoder(pixels.to(encoder.dtype), output_hidden_states=True)
        return out.hidden_states[-2]

    def condition(
        self,
        input_ids: torch.Tensor,
        token_index: torch.Tensor,
        face_pixels: torch.Tensor,
        region_pixels: torch.Tensor,
        region_present: torch.Tensor,
        id_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet's encoder_hidden_states (B, 77 + num_id_tokens, W): the text with region
        features fused at the `<|facial|>` positions, then the ID tokens."""
        with torch.no_grad():
            text = self.frozen.text_encoder(input_ids)[0]
        images = (face_pixels, region_pixels, region_present, id_embeds)
        return self.condition_text(text, token_index, *images)

    def condition_text(
        self,
        text: torch.Tensor,
        token_index: torch.Tensor,
        face_pixels: torch.Tensor,
        region_pixels: torch.Tensor,
        region_present: torch.Tensor,
        id_embeds: torch.Tensor,
        shortcut: bool = False,
    ) -> torch.Tensor:
        """`condition` from the text encoder's output (B, L, W) (SDXL: both encoders' states
        side by side); `shortcut` as IDProjection's."""
        dtype = self.id_projection.norm.weight.dtype
        text = text.to(dtype)
        with torch.no_grad():
            face = self.clip_patches(face_pixels).to(dtype)
            regions = face.new_zeros(*region_present.shape, *face.shape[1:])
            if region_present.any():
                regions[region_present] = self.clip_patches(region_pixels[region_present]).to(dtype)
        id_tokens = self.id_projection(id_embeds.to(dtype), face, shortcut)
        region_tokens = self.facial_encoder.encode(face, regions, region_present)
        # A token whose region the reference lacks keeps its plain `<|facial|>` embedding.
        usable = torch.where(region_present, token_index, torch.full_like(token_index, -1))
        text = self.facial_encoder.fuse(text, region_tokens, usable)
        return torch.cat([text, id_tokens.to(text.dtype)], dim=1)

    # -- one training step -----------------------------------------------------------------------

    # The ID projection's shortcut (its unrefined tokens added to the refined ones) in training:
    # the SD 1.5 release trained and generates without it.
    training_shortcut = False

    def training_text(self, batch: dict, drop: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(text encoder states (B, 77, W), extra UNet inputs) of a training batch; a dropped
        sample reads the empty prompt."""
        ids = torch.where(drop[:, None], self.empty_ids, batch["input_ids"])
        with torch.no_grad():
            return self.frozen.text_encoder(ids)[0], {}

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch (training/loader.py's ConsistentID batch). Randomness (augmentation,
        condition drop, noise, timesteps, mask choice) comes from torch's global RNG."""
        opts, frozen = self.loss_options, self.frozen
        pixels, foreground = batch["pixel_values"], batch["foreground_mask"]
        b, device = pixels.shape[0], pixels.device

        # Background removal as the spec states it. (The reference data loader builds a
        # black-background copy of the target, but its trainer encodes the original image.)
        blank = torch.rand(b, device=device) < opts.background_removal_prob
        blank = blank[:, None, None, None] & (foreground < 0.5)
        pixels = torch.where(blank, torch.full_like(pixels, opts.background_value), pixels)
        with torch.no_grad():
            latents = frozen.vae.encode(pixels.to(frozen.vae.dtype)).latent_dist.sample()
            latents = latents.float() * frozen.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        steps = frozen.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (b,), device=device)
        noisy = frozen.scheduler.add_noise(latents, noise, timesteps)

        # Condition drop: empty text, zero images and, unlike the reference trainer (which keeps
        # the ID embedding), a zero ID embedding: exactly the negative branch used at inference.
        drop = torch.rand(b, device=device) < opts.condition_drop_prob
        keep = (~drop).float()
        token_index = torch.where(drop[:, None], -1, batch["region_token_index"])
        text, unet_inputs = self.training_text(batch, drop)
        cond = self.condition_text(
            text,
            token_index,
            batch["ref_face_pixel_values"] * keep[:, None, None, None],
            batch["ref_region_pixel_values"] * keep[:, None, None, None, None],
            batch["ref_region_present"] & ~drop[:, None],
            batch["ref_id_embeds"] * keep[:, None],
            shortcut=self.training_shortcut,
        )

        self.store.start(token_index if opts.localization_weight > 0 else None)
        try:
            pred = frozen.unet(noisy.to(frozen.unet.dtype), timesteps, cond, **unet_inputs).sample
        finally:
            maps = self.store.stop()
        masked = torch.rand(b, device=device) < opts.foreground_loss_prob
        mse = noise_loss(pred, noise, foreground, masked)
        loss, logs = mse, {"noise_mse": float(mse.detach())}
        if maps:
            valid = (token_index >= 0) & batch["region_present"]
            hw = tuple(latents.shape[-2:])
            masks = batch["region_masks"]
            loc = localization_loss(maps, masks, valid, hw, opts.localization_normalize)
            loss = loss + opts.localization_weight * loc
            logs["localization"] = float(loc.detach())
        return loss, logs
