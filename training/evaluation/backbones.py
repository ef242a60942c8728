"""The image/text backbones the metrics embed with: CLIP (CLIP-T, CLIP-I) and DINO (DINO, FGIS).

Each loads once from a hub name or a local folder (`from_pretrained`) and embeds a batch per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3), contiguous."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def normalize(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ClipScorer:
    """CLIP image and text embeddings (L2-normalised), the space of CLIP-T and CLIP-I."""

    def __init__(self, model, processor, device: str = "cpu", batch_size: int = 32) -> None:
        self.model = model.to(device).eval()
        self.processor, self.device, self.batch_size = processor, device, batch_size
        self.name = getattr(model.config, "_name_or_path", "") or "clip"

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str = "auto", **kw) -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        device = resolve_device(device)
        return cls(
            CLIPModel.from_pretrained(name_or_path),
            CLIPProcessor.from_pretrained(name_or_path),
            device,
            **kw,
        )

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        out = []
        for chunk in _chunks(list(images), self.batch_size):
            pixels = self.processor.image_processor(
                images=[as_pil(i) for i in chunk], return_tensors="pt"
            )["pixel_values"].to(self.device)
            out.append(normalize(_pooled(self.model.get_image_features(pixel_values=pixels))))
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim))

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        tokenizer = self.processor.tokenizer
        for chunk in _chunks(list(texts), self.batch_size):
            tokens = tokenizer(
                list(chunk),
                padding=True,
                truncation=True,
                max_length=min(tokenizer.model_max_length, 77),
                return_tensors="pt",
            ).to(self.device)
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            out.append(normalize(_pooled(features)))
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim))


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns the projected embedding as `pooler_output`; 4.x returned a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DinoScorer:
    """DINO ViT CLS features (ViT-S/16 in the paper: facebook/dino-vits16)."""

    def __init__(self, model, processor, device: str = "cpu", batch_size: int = 32) -> None:
        self.model = model.to(device).eval()
        self.processor, self.device, self.batch_size = processor, device, batch_size
        self.name = getattr(model.config, "_name_or_path", "") or "dino"

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str = "auto", **kw) -> DinoScorer:
        from transformers import AutoImageProcessor, ViTModel

        device = resolve_device(device)
        model = ViTModel.from_pretrained(name_or_path, add_pooling_layer=False)
        return cls(model, AutoImageProcessor.from_pretrained(name_or_path), device, **kw)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def cls_features(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """Raw CLS token of the last layer, (N, hidden)."""
        out = []
        for chunk in _chunks(list(images), self.batch_size):
            pixels = self.processor(images=[as_pil(i) for i in chunk], return_tensors="pt")
            hidden = self.model(pixel_values=pixels["pixel_values"].to(self.device))
            out.append(hidden.last_hidden_state[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    def embeddings(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        return normalize(self.cls_features(images))
