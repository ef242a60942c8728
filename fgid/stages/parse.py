"""Face parsing into CelebAMask-HQ label maps, and the five facial regions derived from them."""

from __future__ import annotations

import numpy as np

from fgid.protocols import FaceParser
from fgid.sample import Sample
from fgid.schema import REGIONS
from fgid.stages.base import Stage

# A region needs this fraction of the crop to count as present (~52 px at 512x512).
MIN_REGION_FRACTION = 2e-4


def region_mask(label_map: np.ndarray, region: str) -> np.ndarray:
    """Boolean HxW mask of one of the five regions."""
    return np.isin(label_map, REGIONS[region])


def regions_present(label_map: np.ndarray) -> list[str]:
    # One histogram of the classes, not a mask per region: a pass over the map, not five.
    counts = np.bincount(label_map.ravel(), minlength=256)
    min_pixels = MIN_REGION_FRACTION * label_map.size
    return [name for name, ids in REGIONS.items() if counts[list(ids)].sum() >= min_pixels]


def region_image(image: np.ndarray, label_map: np.ndarray, region: str) -> np.ndarray:
    """The reference loader's region image: the full aligned image, black outside the region."""
    out = np.zeros_like(image)
    mask = region_mask(label_map, region)
    out[mask] = image[mask]
    return out


def regions_unseen(parser: FaceParser) -> list[str]:
    """Regions the parser can never produce: absent from its output says nothing about the face."""
    return [name for name, ids in REGIONS.items() if set(ids) <= parser.unseen_classes]


class ParseStage(Stage):
    name = "parse"

    def __init__(self, parser: FaceParser) -> None:
        super().__init__()
        self.parser = parser

    def process(self, samples: list[Sample]) -> None:
        maps = self.parser.parse([s.aligned for s in samples], [s.aligned_dense for s in samples])
        for sample, label_map in zip(samples, maps, strict=True):
            if label_map.shape != sample.aligned.shape[:2] or label_map.dtype != np.uint8:
                raise ValueError(f"parser returned {label_map.shape} {label_map.dtype}")
            sample.label_map = label_map
            sample.regions = regions_present(label_map)
