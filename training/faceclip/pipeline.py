"""FaceCLIP-SDXL inference: SDXL sampling conditioned on FaceCLIP, with the zero-face negative.

The positive branch is FaceCLIP(reference face, prompt) with identity injection; the negative
branch is what training's condition drop shows the UNet: an all-zero face image, the negative
prompt (empty by default) and no `Photo of a id person.` prefix. Classifier-free guidance mixes
the two. The face is the reference's aligned image warped to the 112x112 ArcFace crop from its
landmarks. Default size is the released model's 1152 (height) x 864 (width).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from training.faceclip.config import RUN_FILE, EncoderConfig
from training.faceclip.encoder import FaceCLIPEncoder, FaceCLIPOutput

if TYPE_CHECKING:
    from PIL import Image

    from training.reference import Reference

log = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "model.safetensors"  # Accelerate's checkpoint of the trained module


def face_tensor(reference: Reference) -> torch.Tensor:
    """(1, 3, 112, 112) float32 in [-1, 1]: the reference's ArcFace crop."""
    from training.regions import arcface_crop

    crop = arcface_crop(np.asarray(reference.image), np.asarray(reference.landmarks, np.float32))
    face = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float()
    return (face / 127.5 - 1.0)[None]


def _load_models(
    base_model: str,
    weights: Path,
    encoder: str | None,
    face_encoder: str | None,
    dtype,
    architecture: EncoderConfig | dict | None = None,
):
    """(UNet, FaceCLIPEncoder) from a release (face_clip_encoder.pt [+ unet.pt]), an exported
    folder (final/) or a checkpoint-{step} folder. `architecture`: the release's encoder
    (towers, face ViT, fuser) when it is not the released one; its file does not record it."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from training.faceclip.convert import is_release, release_files
    from training.faceclip.sdxl import load_released_unet

    def base_unet():
        return UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", dtype=dtype)

    if is_release(weights):
        encoder_file, _ = release_files(weights)
        config = EncoderConfig.model_validate(architecture or {})
        enc = FaceCLIPEncoder.build(
            config.model_copy(update={"init_from_reference": str(encoder_file)})
        )
        unet = base_unet()
        load_released_unet(unet, weights)
        return unet, enc
    overrides = {"face_encoder": face_encoder}
    if (weights / "encoder").is_dir() or encoder:  # an export
        enc = FaceCLIPEncoder.from_pretrained(encoder or weights, **overrides)
        if (weights / "unet").is_dir():
            return UNet2DConditionModel.from_pretrained(weights / "unet", dtype=dtype), enc
        log.warning("%s holds no fine-tuned UNet: using the base model's", weights)
        return base_unet(), enc

    run_file = weights.parent / RUN_FILE
    if not (weights / CHECKPOINT_WEIGHTS).is_file() or not run_file.is_file():
        raise FileNotFoundError(
            f"{weights} is neither a FaceCLIP release, an export nor a run's checkpoint"
        )
    run = json.loads(run_file.read_text())
    state = load_file(str(weights / CHECKPOINT_WEIGHTS))
    unet = base_unet()
    if run["stage"] == "sdxl":
        unet.load_state_dict({k.removeprefix("unet."): v for k, v in state.items()})
        source = run["encoder_weights"]
        if source:
            return unet, FaceCLIPEncoder.from_pretrained(source, **overrides)
        config = EncoderConfig.model_validate(run["encoder"])
        return unet, FaceCLIPEncoder.build(config)
    config = EncoderConfig.model_validate(run["encoder"])
    enc = FaceCLIPEncoder.build(
        config.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    )
    prefix = "encoder."
    trained = enc.trainable_state()
    enc.load_trained({k[len(prefix) :]: v for k, v in state.items() if k[len(prefix) :] in trained})
    log.warning("%s is an alignment checkpoint: using the base model's UNet", weights)
    return unet, enc


class FaceCLIPGenerator:
    """training.evaluation.protocols.Generator for FaceCLIP-SDXL."""

    def __init__(
        self,
        pipeline,
        encoder: FaceCLIPEncoder,
        steps: int = 50,
        guidance_scale: float = 5.0,
        height: int = 1152,
        width: int = 864,
        negative_prompt: str = "",
        name: str = "faceclip-sdxl",
    ):
        self.pipeline, self.encoder, self.name = pipeline, encoder, name
        self.steps, self.guidance_scale = steps, guidance_scale
        self.height, self.width, self.negative_prompt = height, width, negative_prompt

    @classmethod
    def from_pretrained(
        cls,
        base_model: str,
        weights: str | Path,
        encoder: str | None = None,
        face_encoder: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        architecture: EncoderConfig | dict | None = None,
        **settings,
    ) -> FaceCLIPGenerator:
        """`weights`: a FaceCLIP-SDXL release (`face_clip_encoder.pt` with `unet.pt` beside it,
        or their folder), an exported `final/` folder or a `checkpoint-{step}` folder of a run.
        `encoder` overrides where the encoder export is; `face_encoder` where the face ViT
        weights are on this machine; `architecture` the encoder a release holds when it is not
        the released one (an `EncoderConfig` or its fields). `settings`: steps, guidance_scale,
        height, width, negative_prompt, name."""
        from diffusers import StableDiffusionXLPipeline

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        unet, enc = _load_models(
            base_model, Path(weights), encoder, face_encoder, dtype, architecture
        )
        if "name" not in settings:
            from training.faceclip.convert import is_release

            if is_release(weights):  # a row of its own beside models trained here
                settings["name"] = "faceclip-sdxl-release"
        # FaceCLIP replaces SDXL's text encoders: the pipeline gets embeddings, never text.
        towers = dict.fromkeys(("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            base_model, unet=unet, dtype=dtype, **towers
        )
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(device)
        enc.to(device, dtype).eval()
        return cls(pipeline, enc, **settings)

    @torch.no_grad()
    def conditions(self, reference: Reference, prompt: str) -> dict[str, FaceCLIPOutput]:
        """The positive (reference face + prompt) and negative (zero face) conditionings."""
        device, dtype = self.encoder.device, self.encoder.face_vit.pos_embed.dtype
        face = face_tensor(reference).to(device, dtype)
        return {
            "positive": self.encoder(face, [prompt], with_identity=[True]),
            "negative": self.encoder(
                torch.zeros_like(face), [self.negative_prompt], with_identity=[False]
            ),
        }

    def generate(self, reference: Reference, prompt: str, seed: int) -> Image.Image:
        cond = self.conditions(reference, prompt)
        dtype = self.pipeline.unet.dtype
        # A CPU generator gives the same starting noise on every device and for every run.
        generator = torch.Generator("cpu").manual_seed(seed)
        result = self.pipeline(
            prompt_embeds=cond["positive"].tokens.to(dtype),
            pooled_prompt_embeds=cond["positive"].pooled.to(dtype),
            negative_prompt_embeds=cond["negative"].tokens.to(dtype),
            negative_pooled_prompt_embeds=cond["negative"].pooled.to(dtype),
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            generator=generator,
        )
        return result.images[0]
