"""FaceCLIP's training batch: the reference face (ArcFace crop, embedding), target, caption."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from training.regions import ARCFACE_SIZE, arcface_crop, clip_preprocess, to_unit_range

if TYPE_CHECKING:
    from training.loader import Item, LoaderConfig


class FaceCLIPBatch:
    """Items -> the FaceCLIP batch dict: reference face, target image and caption
    (training/loader.py adds the identity fields)."""

    def __init__(self, config: LoaderConfig) -> None:
        self.config = config

    def __call__(self, items: list[Item]) -> dict:
        cfg = self.config
        targets, refs = [t for t, _, _ in items], [r for _, r, _ in items]
        images = np.stack([t.image for t in targets])
        faces = np.stack([arcface_crop(r.image, r.landmarks) for r in refs])
        return {
            "caption": [t.caption for t in targets],
            "ref_face_112": to_unit_range(faces, ARCFACE_SIZE),
            "ref_id_embeds": torch.from_numpy(np.stack([r.embedding for r in refs])),
            "pixel_values": to_unit_range(images, cfg.resolution),
            "clip_pixel_values": clip_preprocess(
                images, cfg.clip_size, cfg.clip_mean, cfg.clip_std
            ),
            "original_size": torch.tensor([t.image.shape[:2] for t in targets], dtype=torch.long),
            "crop_top_left": torch.zeros(len(items), 2, dtype=torch.long),
        }
