"""ConsistentID inference: DDIM with classifier-free guidance and the delayed merge step.

Steps before `merge_step` are conditioned on the text without facial markers plus the ID tokens;
from `merge_step` on, on the text with the region features fused in (plus the ID tokens). The
reference starts fusing one step later (it compares `i <= merge_step`); here `merge_step=0` fuses
from the first step and `merge_step=steps` never does. The text is the released model's
(training/consistentid/prompt.py: the user prompt, then its built-in facial description). The
negative branch is the reference's: the negative prompt, blank images, a zero ID embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.consistentid import prompt
from training.consistentid.config import ModelOptions
from training.consistentid.model import ConsistentID

WEIGHTS = "consistentid.safetensors"  # export
CHECKPOINT_WEIGHTS = "model.safetensors"  # Accelerate's checkpoint of the same state dict
CONFIG = "consistentid.json"


def _find(folder: Path, names: tuple[str, ...]) -> Path:
    for place in (folder, folder.parent):
        for name in names:
            if (place / name).is_file():
                return place / name
    raise FileNotFoundError(f"none of {names} in {folder} or its parent")


def find_weights(folder: str | Path) -> Path:
    """The weights of an export (`final/`) or `checkpoint-{step}` folder."""
    return _find(Path(folder), (WEIGHTS, CHECKPOINT_WEIGHTS))


def find_config(folder: str | Path) -> Path:
    return _find(Path(folder), (CONFIG,))


def load_weights(model: ConsistentID, weights: str | Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(find_weights(weights))))


def load_export(
    model_class: type[ConsistentID],
    base_model: str,
    weights: str | Path,
    image_encoder: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> ConsistentID:
    """An export or checkpoint folder as a `model_class` on `base_model`, in eval mode on
    `device` (default CUDA where there is one) in `dtype` (default bfloat16 on CUDA)."""
    config = json.loads(find_config(weights).read_text())
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):  # from YAML or --set: "bfloat16"
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    frozen = model_class.frozen_loader(base_model, image_encoder or config.get("image_encoder"))
    model = model_class(frozen, config["id_dim"], ModelOptions(**config["options"]))
    load_weights(model, weights)
    return model.to(device=device, dtype=dtype).eval()


def reference_inputs(frozen, reference) -> dict[str, torch.Tensor]:
    """A reference's CLIP inputs (face, five region images, which regions it has) and its ID
    embedding, each with a batch axis of one."""
    from training.regions import clip_preprocess, region_images, region_masks

    size = frozen.image_encoder.config.image_size
    present = region_masks(reference.label_map).reshape(5, -1).any(axis=1)
    face = clip_preprocess(reference.image, size, frozen.image_mean, frozen.image_std)
    regions = clip_preprocess(
        region_images(reference.image, reference.label_map),
        size,
        frozen.image_mean,
        frozen.image_std,
    )
    regions[torch.from_numpy(~present)] = 0.0
    return {
        "face": face[None],
        "regions": regions[None],
        "present": torch.from_numpy(present)[None],
        "embedding": torch.as_tensor(np.asarray(reference.embedding, np.float32))[None],
    }


class LoadsExport:
    """`from_pretrained` of a generator built on `model_class` (SD 1.5 or SDXL ConsistentID)."""

    model_class: type[ConsistentID]

    @classmethod
    def from_pretrained(
        cls,
        base_model: str,
        weights: str | Path,
        image_encoder: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **settings,
    ):
        """`weights`: a run's `final/` or `checkpoint-{step}` folder, or one `fgid convert
        consistentid --from-reference` wrote from a release. `settings`: steps,
        guidance_scale, merge_step, height, width, negative_prompt, name."""
        model = load_export(cls.model_class, base_model, weights, image_encoder, device, dtype)
        return cls(model, base_model, **settings)


class ConsistentIDGenerator(LoadsExport):
    """training.evaluation.protocols.Generator for a trained ConsistentID."""

    model_class = ConsistentID

    def __init__(
        self,
        model: ConsistentID,
        base_model: str,
        steps: int = 50,
        guidance_scale: float = 5.0,
        merge_step: int = 30,
        height: int = 512,
        width: int = 512,
        negative_prompt: str = "",
        name: str = "consistentid",
    ):
        from diffusers import DDIMScheduler

        self.model, self.name = model, name
        self.steps, self.guidance_scale, self.merge_step = steps, guidance_scale, merge_step
        self.height, self.width, self.negative_prompt = height, width, negative_prompt
        self.scheduler = DDIMScheduler.from_pretrained(base_model, subfolder="scheduler")

    # -- inputs ----------------------------------------------------------------------------------

    def _reference_inputs(self, reference) -> dict[str, torch.Tensor]:
        return reference_inputs(self.model.frozen, reference)

    def _ids(self, text: str) -> torch.Tensor:
        tokens = self.model.frozen.tokenizer(
            text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids

    def _texts(self, prompt_text: str, present: list[bool]):
        """(fused ids, region_token_index, text-only ids) for one prompt."""
        tokenizer = self.model.frozen.tokenizer
        if self.model.options.keep_facial_token:
            from training.text import build_inference_prompt, tokenize_facial

            text = build_inference_prompt(prompt_text, tokenizer=tokenizer)
            ids, index = tokenize_facial(tokenizer, text, present)
            return ids, index, tokenize_facial(tokenizer, text, [False] * 5)[0]
        text, kept = prompt.inference_prompt(tokenizer, prompt_text, present=present)
        ids, index = prompt.tokenize(tokenizer, text, kept)
        return ids, index, prompt.plain_ids(tokenizer, text)

    @torch.no_grad()
    def conditions(self, reference, prompt_text: str) -> dict[str, torch.Tensor]:
        """The three UNet conditionings of one generation: negative, text + ID, fused + ID.

        As the reference pipeline does, the negative prompt's embedding is fused too, at the
        prompt's region positions, with the features of blank region images (with
        `keep_facial_token` the negative prompt has no marker and stays unfused)."""
        model, device = self.model, self.model.empty_ids.device
        ref = {k: v.to(device) for k, v in self._reference_inputs(reference).items()}
        ids, index, plain = self._texts(prompt_text, ref["present"][0].tolist())
        index = index[None].to(device)
        none = torch.full_like(index, -1)
        images = (ref["face"], ref["regions"], ref["present"], ref["embedding"])
        fused = model.condition(ids[None].to(device), index, *images)
        text_only = model.condition(plain[None].to(device), none, *images)
        negative = model.condition(
            self._ids(self.negative_prompt).to(device),
            none if model.options.keep_facial_token else index,
            torch.zeros_like(ref["face"]),
            torch.zeros_like(ref["regions"]),
            ref["present"],
            torch.zeros_like(ref["embedding"]),
        )
        return {"negative": negative, "text": text_only, "fused": fused}

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, reference, prompt: str, seed: int, merge_step: int | None = None
    ) -> Image.Image:
        merge_step = self.merge_step if merge_step is None else merge_step
        conds = self.conditions(reference, prompt)
        frozen, scheduler = self.model.frozen, self.scheduler
        unet, vae = frozen.unet, frozen.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (1, unet.config.in_channels, self.height // factor, self.width // factor)
        # Noise drawn on the CPU: the same seed gives the same image on any device.
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(shape, generator=generator).to(unet.device)
        scheduler.set_timesteps(self.steps, device=unet.device)
        latents = latents * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            cond = conds["text"] if i < merge_step else conds["fused"]
            inputs = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            cond = torch.cat([conds["negative"], cond]).to(unet.dtype)
            eps = unet(inputs.to(unet.dtype), t, cond).sample.float()
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample[0]
        array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
        return Image.fromarray(array.cpu().numpy())
