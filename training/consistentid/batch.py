"""ConsistentID's training batch: target image and masks, text tokens, reference region images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from training.consistentid import prompt
from training.regions import (
    clip_preprocess,
    region_images,
    region_masks,
    resize_label_map,
    to_unit_range,
)
from training.text import build_prompt, tokenize_facial

if TYPE_CHECKING:
    from training.loader import Item, LoaderConfig


class ConsistentIDBatch:
    """Items -> the ConsistentID batch dict (training/loader.py adds the identity fields).

    A region counts when both the target (its mask) and the reference (its image) show it.
    `keep_facial_token` selects the text path (ModelOptions.keep_facial_token). With SDXL's
    second tokenizer (`tokenizer_2`) the batch also holds its ids of the same text
    (`input_ids_2`) and SDXL's micro-conditioning (`time_ids`)."""

    def __init__(
        self,
        tokenizer,
        config: LoaderConfig,
        keep_facial_token: bool = False,
        tokenizer_2=None,
    ) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.keep_facial_token = keep_facial_token
        self.tokenizer_2 = tokenizer_2

    def text(self, caption: str, facial: str, present) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(text, input_ids, region_token_index) of one sample."""
        tokenizer, length = self.tokenizer, self.config.max_length
        if not self.keep_facial_token:
            return prompt.encode_training(tokenizer, caption, facial, present, length)
        text = build_prompt(caption, facial, tokenizer, length)
        return (text, *tokenize_facial(tokenizer, text, present, length))

    def __call__(self, items: list[Item]) -> dict:
        cfg, size = self.config, self.config.resolution
        targets, refs = [t for t, _, _ in items], [r for _, r, _ in items]
        labels = np.stack([resize_label_map(t.label_map, size) for t in targets])
        masks = np.stack([region_masks(label) for label in labels])
        present = masks.any(axis=(2, 3))
        ref_present = np.stack([region_masks(r.label_map).any(axis=(1, 2)) for r in refs])
        texts, ids, positions = [], [], []
        for t, both in zip(targets, present & ref_present, strict=True):
            text, input_ids, index = self.text(t.caption, t.facial, both.tolist())
            texts.append(text)
            ids.append(input_ids)
            positions.append(index)
        # Absent regions stay zero (the reference's padding), so only present ones are resized.
        views = np.concatenate(
            [np.stack([r.image for r in refs])]
            + [
                region_images(r.image, r.label_map)[p]
                for r, p in zip(refs, ref_present, strict=True)
            ]
        )
        clip = clip_preprocess(views, cfg.clip_size, cfg.clip_mean, cfg.clip_std)
        regions = torch.zeros(len(refs), len(ref_present[0]), *clip.shape[1:])
        regions[torch.from_numpy(ref_present)] = clip[len(refs) :]
        batch = {
            "text": texts,
            "pixel_values": to_unit_range(np.stack([t.image for t in targets]), size),
            "foreground_mask": torch.from_numpy(labels != 0)[:, None].float(),
            "region_masks": torch.from_numpy(masks).float(),
            "region_present": torch.from_numpy(present),
            "input_ids": torch.stack(ids),
            "region_token_index": torch.stack(positions),
            "ref_face_pixel_values": clip[: len(refs)],
            "ref_region_pixel_values": regions,
            "ref_region_present": torch.from_numpy(ref_present),
            "ref_id_embeds": torch.from_numpy(np.stack([r.embedding for r in refs])),
        }
        if self.tokenizer_2 is not None:
            length = cfg.max_length
            batch["input_ids_2"] = torch.stack(
                [prompt.spelled_ids(self.tokenizer_2, text, length) for text in texts]
            )
            batch["time_ids"] = time_ids([t.image.shape[:2] for t in targets], size)
        return batch


def time_ids(sizes: list[tuple[int, int]], size: int) -> torch.Tensor:
    """SDXL's micro-conditioning (B, 6) as the reference trainer builds it: original (h, w),
    crop top-left, target (h, w). A target is resized whole, never cropped: crop (0, 0)."""
    return torch.tensor([[h, w, 0, 0, size, size] for h, w in sizes], dtype=torch.float32)
