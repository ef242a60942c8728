"""BiSeNet face parser (facexlib, CelebAMask-HQ's 19 classes) over aligned crops, batched."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fgid.backends.full.device import pinned_zeros
from fgid.config import BuildConfig

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "parsing_bisenet.pth"
INPUT_SIZE = 512
# ImageNet statistics, which the facexlib BiSeNet weights were trained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Bounds activation memory when a caller hands over a large batch.
CHUNK = 16


class BiSeNetParser:
    """Aligned RGB crops -> uint8 label maps (0..18) of the crop's own size."""

    unseen_classes: frozenset[int] = frozenset()

    def __init__(self, config: BuildConfig, device: str):
        import torch
        from facexlib.parsing import init_parsing_model

        root = config.models.facexlib_root
        if root is not None:
            # facexlib downloads any file it does not find; an explicit root must already hold it.
            weights = Path(root).expanduser() / WEIGHTS_FILE
            if not weights.is_file():
                raise FileNotFoundError(
                    f"BiSeNet weights {weights} not found; set models.facexlib_root to a dir "
                    f"holding {WEIGHTS_FILE}"
                )
            root = str(weights.parent)
        # facexlib defaults to cuda; pass the resolved device so CPU machines work.
        self.model = init_parsing_model("bisenet", device=device, model_rootpath=root)
        self.device = torch.device(device)
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        self.name = "facexlib-bisenet"
        logger.info("loaded BiSeNet parser on %s", device)

    def parse(
        self, aligned: list[np.ndarray], dense_landmarks: list[np.ndarray | None]
    ) -> list[np.ndarray]:
        labels: list[np.ndarray] = []
        for start in range(0, len(aligned), CHUNK):
            labels.extend(self._parse_chunk(aligned[start : start + CHUNK]))
        return labels

    def _parse_chunk(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        import cv2
        import torch

        size = (INPUT_SIZE, INPUT_SIZE)
        cuda = self.device.type == "cuda"
        batch, pinned = pinned_zeros((len(crops), INPUT_SIZE, INPUT_SIZE, 3), cuda)
        for i, crop in enumerate(crops):
            batch[i] = cv2.resize(crop, size, interpolation=cv2.INTER_LINEAR)
        # uint8 crosses to the GPU (a quarter of the float bytes), from page-locked memory there.
        host = pinned if cuda else torch.from_numpy(batch)
        x = host.to(self.device, non_blocking=cuda).permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        with torch.inference_mode():
            logits = self.model(x)[0]  # BiSeNet returns (out, out16, out32); out is the head
        maps = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
        return [
            cv2.resize(m, (c.shape[1], c.shape[0]), interpolation=cv2.INTER_NEAREST)
            for m, c in zip(maps, crops, strict=True)
        ]
