"""A text-only Stable Diffusion generator: the comparison row that ignores the reference face."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from training.evaluation.backbones import resolve_device

if TYPE_CHECKING:
    from training.reference import Reference


class TextOnlyGenerator:
    """`generate` draws the prompt alone with the base model; the reference is not looked at.

    Sampling follows the ConsistentID inference settings (FGID_SPEC §5: DDIM, 50 steps,
    guidance 5) so that the only difference from the identity-preserving rows is the identity."""

    def __init__(
        self,
        pipeline,
        name: str = "sd-text-only",
        steps: int = 50,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        self.pipeline, self.name = pipeline, name
        self.steps, self.guidance_scale = steps, guidance_scale
        self.height, self.width, self.negative_prompt = height, width, negative_prompt

    @classmethod
    def from_pretrained(
        cls,
        base_model: str,
        device: str = "auto",
        dtype: str = "auto",
        scheduler: str = "auto",
        **options,
    ) -> TextOnlyGenerator:
        """Load a diffusers Stable Diffusion pipeline (hub name or folder with model_index.json):
        SD 1.5, or SDXL when the base's UNet takes SDXL's conditioning. An SDXL base draws as the
        SDXL ConsistentID does (Euler, guidance 7.5, 1152 x 864, training/consistentid/sdxl.py)
        unless `options` say otherwise, so that again only the identity differs.

        The safety checker is not loaded: it would blank some images of a run and not others,
        which no metric row could account for."""
        from diffusers import (
            DDIMScheduler,
            EulerDiscreteScheduler,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
        )

        from training.consistentid.sdxl import base_variant

        device = resolve_device(device)
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        if base_variant(base_model) == "sdxl":
            pipeline = StableDiffusionXLPipeline.from_pretrained(
                base_model, torch_dtype=getattr(torch, dtype)
            )
            options = {"name": "sdxl-text-only", "guidance_scale": 7.5, "height": 1152,
                       "width": 864, **options}  # fmt: skip
            scheduler = "euler" if scheduler == "auto" else scheduler
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(
                base_model,
                torch_dtype=getattr(torch, dtype),
                safety_checker=None,
                requires_safety_checker=False,
            )
            scheduler = "ddim" if scheduler == "auto" else scheduler
        if scheduler == "ddim":
            pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        elif scheduler == "euler":
            pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline.to(device), **options)

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    def generate(self, reference: Reference, prompt: str, seed: int) -> Image.Image:
        # A CPU generator gives the same starting noise on every device and for every run.
        generator = torch.Generator("cpu").manual_seed(seed)
        result = self.pipeline(
            prompt,
            negative_prompt=self.negative_prompt,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            generator=generator,
        )
        return result.images[0]
