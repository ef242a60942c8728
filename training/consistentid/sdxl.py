"""ConsistentID on SDXL: the released SDXL variant (`ConsistentID_SDXL-v1.bin`) as a model and a
generator.

The trainable parts are SD 1.5's classes at SDXL's sizes: ID tokens and fusion as wide as the
UNet's cross-attention (2048), CLIP ViT-H/14 patch features (1280) in, LoRA + ID processors on
every attention layer of the UNet. The frozen parts are SDXL's own (two text encoders, the UNet
with its `text_time` conditioning, the VAE), driven through diffusers' StableDiffusionXLPipeline.
Generation follows the reference's `pipline_StableDiffusionXL_ConsistentID.py`:

- Text with the face (from `merge_step` on): `<prompt>; Detail:<detail>` (`; Detail:<detail>
  Caption:<prompt>` past 77 tokens), the description "... two ears, and a mouth." The first
  tokenizer knows `<|facial|>`: the markers are removed and each region word's position kept
  (prompt.tokenize). The second does not: it reads the same text with the markers spelled out as
  plain text, cut at 77 tokens (no end token then) or padded. Each encoder's `hidden_states[-2]`
  go side by side (768 + 1280 = 2048) and each region's feature replaces the whole 2048-wide
  vector at its word's position in the first tokenization. The pooled embedding is the second
  encoder's projected output for that text. (The reference trainer fed the second encoder the
  text without markers.)
- Text without the face (before `merge_step`): the user prompt alone, encoded the way SDXL's
  pipeline encodes a prompt (`encode_prompt`), its pooled embedding too.
- Negative: SDXL's own (all zeros without a negative prompt, as the base's
  `force_zeros_for_empty_prompt` says); in the fused steps with the features of blank region
  images fused at the prompt's region positions; its pooled embedding the same in both phases.
- The 4 ID tokens follow the 77 text tokens (the processors split them off). At inference the
  ID projection adds its refined tokens to the unrefined ones (`shortcut`), as the SDXL pipeline
  does (its trainer did not); the negative's come from a zero embedding and a zero image.
- Micro-conditioning (h, w, 0, 0, h, w); an Euler discrete scheduler on the base's schedule;
  50 steps, guidance 7.5, merge step 30 (fused from step 30 on, one earlier than the reference,
  as on SD 1.5: training/consistentid/pipeline.py), 1152 x 864 (`infer_SDXL.py`).

Training and fine-tuning: `ConsistentIDXL`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from PIL import Image
from torch import nn

from training.consistentid import prompt
from training.consistentid.config import LossOptions, ModelOptions
from training.consistentid.model import ConsistentID, Frozen, load_frozen
from training.consistentid.pipeline import LoadsExport, reference_inputs

# The SDXL pipeline's built-in description of the reference face (SD 1.5's says "one mouth").
INFERENCE_FACIAL = "The person has one face, one nose, two eyes, two ears, and a mouth."
DETAIL_SEPARATOR = "; "


@dataclass
class FrozenXL(Frozen):
    text_encoder_2: nn.Module
    tokenizer_2: object

    def modules(self) -> list[nn.Module]:
        return [*super().modules(), self.text_encoder_2]


def load_frozen_xl(
    base_model: str, image_encoder: str | None = None, dtype: torch.dtype | None = None
) -> FrozenXL:
    """SD 1.5's frozen set read from an SDXL folder, plus its second tokenizer (without
    `<|facial|>`) and text encoder (with projection)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    frozen = load_frozen(base_model, image_encoder, dtype)
    second = CLIPTextModelWithProjection.from_pretrained(
        base_model, subfolder="text_encoder_2", dtype=dtype or torch.float32
    )
    second.requires_grad_(False).eval()
    return FrozenXL(
        **{f.name: getattr(frozen, f.name) for f in fields(Frozen)},
        text_encoder_2=second,
        tokenizer_2=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer_2"),
    )


def base_variant(base_model: str) -> str:
    """ "sdxl" when the base model's UNet takes SDXL's text_time conditioning, else "sd15"."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"


# The reference SDXL trainer's localisation layers: the 3 central ones (SD 1.5's default is 5).
SDXL_LOCALIZATION_LAYERS = 3


class ConsistentIDXL(ConsistentID):
    """ConsistentID with SDXL's frozen parts; the same trainable parts and state dict keys.

    Training (`forward`, ConsistentID's step) follows the reference's `train_SDXL.py` where the
    released weights do not say otherwise: both encoders' `hidden_states[-2]` side by side with
    the region features fused in, the second encoder's projected pooled output and the
    micro-conditioning (original size, crop (0, 0), target size) as the UNet's added inputs,
    noise MSE (half the time on the foreground) + 0.01 x localisation, on its 3 central
    cross-attention blocks unless `localization_layers` is set. Where that trainer and the
    released pipeline disagree, training follows the pipeline, which is what the released
    weights are generated with: the second encoder reads the text with `<|facial|>` spelled out
    (the trainer removed the markers), the ID projection adds its shortcut (the trainer's did
    not), and the trainable parts have the release's widths (the trainer's FacialEncoder
    defaults are SD 1.5's), so a fine-tune starts from `ConsistentID_SDXL-v1.bin` and converts
    back to it. A dropped condition is SDXL's negative at inference, zero text and pooled
    embeddings (the trainer encoded an empty prompt)."""

    frozen_loader = staticmethod(load_frozen_xl)
    training_shortcut = True

    def __init__(
        self,
        frozen: FrozenXL,
        id_dim: int,
        options: ModelOptions | None = None,
        loss: LossOptions | None = None,
    ):
        options = options or ModelOptions()
        if options.keep_facial_token:
            raise ValueError("ConsistentID-SDXL runs the released text path only")
        if "localization_layers" not in options.model_fields_set:
            options = options.model_copy(update={"localization_layers": SDXL_LOCALIZATION_LAYERS})
        super().__init__(frozen, id_dim, options, loss)

    def training_text(self, batch: dict, drop: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Both encoders' states (B, 77, 2048) and the UNet's `added_cond_kwargs` (pooled
        text, time ids); a dropped sample's text and pooled embeddings are zeros."""
        text, pooled = self.encode_text(batch["input_ids"], batch["input_ids_2"])
        keep = (~drop).to(text.dtype)
        dtype = self.frozen.unet.dtype
        added = {
            "text_embeds": (pooled * keep[:, None]).to(dtype),
            "time_ids": batch["time_ids"].to(dtype),
        }
        return text * keep[:, None, None], {"added_cond_kwargs": added}

    @torch.no_grad()
    def encode_text(
        self, ids: torch.Tensor, ids_2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 77, 768 + 1280) both encoders' `hidden_states[-2]`, (B, 1280) the second's
        projected pooled output."""
        frozen = self.frozen
        first = frozen.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = frozen.text_encoder_2(ids_2, output_hidden_states=True)
        return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds


def fused_text(
    tokenizer, tokenizer_2, prompt_text: str, present: list[bool]
) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text, first encoder's ids without markers, second encoder's ids, region_token_index)
    of the fused branch for one prompt."""
    text, kept = prompt.inference_prompt(
        tokenizer, prompt_text, INFERENCE_FACIAL, present, separator=DETAIL_SEPARATOR
    )
    ids, index = prompt.tokenize(tokenizer, text, kept)
    return text, ids, prompt.spelled_ids(tokenizer_2, text), index


class ConsistentIDXLGenerator(LoadsExport):
    """training.evaluation.protocols.Generator for ConsistentID-SDXL."""

    model_class = ConsistentIDXL

    def __init__(
        self,
        model: ConsistentIDXL,
        base_model: str,
        steps: int = 50,
        guidance_scale: float = 7.5,
        merge_step: int = 30,
        height: int = 1152,
        width: int = 864,
        negative_prompt: str | None = None,
        name: str = "consistentid-sdxl",
    ):
        from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline

        self.model, self.name = model, name
        self.steps, self.guidance_scale, self.merge_step = steps, guidance_scale, merge_step
        self.height, self.width, self.negative_prompt = height, width, negative_prompt
        frozen = model.frozen
        zeros = DiffusionPipeline.load_config(base_model).get("force_zeros_for_empty_prompt", True)
        self.pipeline = StableDiffusionXLPipeline(
            vae=frozen.vae,
            text_encoder=frozen.text_encoder,
            text_encoder_2=frozen.text_encoder_2,
            tokenizer=frozen.tokenizer,
            tokenizer_2=frozen.tokenizer_2,
            unet=frozen.unet,
            scheduler=EulerDiscreteScheduler.from_pretrained(base_model, subfolder="scheduler"),
            force_zeros_for_empty_prompt=zeros,
            add_watermarker=False,
        )
        self.pipeline.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def conditions(self, reference, prompt_text: str) -> dict[str, torch.Tensor]:
        """The UNet's text conditionings of one generation: `text`, `fused` and their
        negatives (B, 77 + ID tokens, 2048), and the pooled embeddings (B, 1280)."""
        model = self.model
        frozen, device = model.frozen, model.empty_ids.device
        ref = {k: v.to(device) for k, v in reference_inputs(frozen, reference).items()}
        _, ids, ids_2, index = fused_text(
            frozen.tokenizer, frozen.tokenizer_2, prompt_text, ref["present"][0].tolist()
        )
        fused, pooled = model.encode_text(ids[None].to(device), ids_2[None].to(device))
        text, negative, text_pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt_text,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=self.negative_prompt,
        )
        index = index[None].to(device)
        none = torch.full_like(index, -1)
        images = (ref["face"], ref["regions"], ref["present"], ref["embedding"])
        blank = (torch.zeros_like(ref["face"]), torch.zeros_like(ref["regions"]), ref["present"])
        blank = (*blank, torch.zeros_like(ref["embedding"]))
        return {
            "text": model.condition_text(text, none, *images, shortcut=True),
            "fused": model.condition_text(fused, index, *images, shortcut=True),
            "negative": model.condition_text(negative, none, *blank, shortcut=True),
            "negative_fused": model.condition_text(negative, index, *blank, shortcut=True),
            "text_pooled": text_pooled,
            "pooled": pooled,
            "negative_pooled": negative_pooled,
        }

    @torch.no_grad()
    def generate(
        self, reference, prompt: str, seed: int, merge_step: int | None = None
    ) -> Image.Image:
        merge_step = self.merge_step if merge_step is None else merge_step
        dtype = self.pipeline.unet.dtype
        c = {k: v.to(dtype) for k, v in self.conditions(reference, prompt).items()}
        fused = {
            "prompt_embeds": torch.cat([c["negative_fused"], c["fused"]]),
            "add_text_embeds": torch.cat([c["negative_pooled"], c["pooled"]]),
        }

        def merge(pipeline, i, t, tensors):  # after step i: the fused text from step i + 1 on
            return fused if i + 1 == merge_step else tensors

        start = ("text", "text_pooled", "negative")
        if merge_step <= 0:
            start = ("fused", "pooled", "negative_fused")
        # A CPU generator gives the same starting noise on every device.
        result = self.pipeline(
            prompt_embeds=c[start[0]],
            pooled_prompt_embeds=c[start[1]],
            negative_prompt_embeds=c[start[2]],
            negative_pooled_prompt_embeds=c["negative_pooled"],
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=merge,
            callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
        )
        return result.images[0]
