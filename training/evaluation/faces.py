"""Faces in generated images, found the way a build finds them: detect, align, parse, embed.

FaceSim and FGIS must see a generated face through the same models as the dataset it is compared
with, so this reuses fgid's model sets (`fgid.models.load_model_set`) and its detect/align/parse
code rather than a second face stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fgid.config import BuildConfig, DetectConfig, ModelsConfig
from fgid.protocols import Detection, ModelSet
from fgid.stages.align import align_face, apply_transform
from fgid.stages.detect import choose_primary
from fgid.stages.parse import region_mask, regions_present

# Bounding-box margin around a region, as a fraction of its side: a little context (eyelids,
# lip outline) without reaching the next region.
REGION_MARGIN = 0.1


@dataclass
class Face:
    """The primary face of one image: its identity embedding, aligned crop and label map."""

    embedding: np.ndarray
    aligned: np.ndarray
    label_map: np.ndarray
    score: float
    box: np.ndarray | None = None  # (4,) x1, y1, x2, y2 in the analysed image


class FaceAnalyzer:
    """Batch-in, batch-out face analysis with one loaded fgid model set."""

    def __init__(
        self, models: ModelSet, align_size: int = 512, min_score: float | None = None
    ) -> None:
        self.models, self.align_size, self.min_score = models, align_size, min_score

    @classmethod
    def load(
        cls,
        models: ModelsConfig | None = None,
        detect: DetectConfig | None = None,
        align_size: int = 512,
    ) -> FaceAnalyzer:
        from fgid.models import load_model_set

        config = BuildConfig(models=models or ModelsConfig(), detect=detect or DetectConfig())
        return cls(load_model_set(config), align_size, config.detect.min_score)

    @property
    def name(self) -> str:
        return f"{self.models.detector.name}+{self.models.embedder.name}+{self.models.parser.name}"

    def analyze(self, images: list[np.ndarray]) -> list[Face | None]:
        """RGB uint8 images -> the largest face of each, or None where no face is found."""
        found = self.models.detector.detect(images)
        primary: list[Detection | None] = []
        for faces in found:
            if self.min_score is not None:
                faces = [f for f in faces if f.score >= self.min_score]
            primary.append(choose_primary(faces) if faces else None)
        hits = [i for i, face in enumerate(primary) if face is not None]
        if not hits:
            return [None] * len(images)
        embeddings = np.asarray(
            self.models.embedder.embed([images[i] for i in hits], [primary[i] for i in hits]),
            dtype=np.float32,
        )
        aligned, dense = [], []
        for i in hits:
            crop, matrix = align_face(images[i], primary[i].landmarks, self.align_size)
            aligned.append(crop)
            points = primary[i].dense_landmarks
            dense.append(None if points is None else apply_transform(matrix, points))
        label_maps = self.models.parser.parse(aligned, dense)
        result: list[Face | None] = [None] * len(images)
        for n, i in enumerate(hits):
            result[i] = Face(
                embeddings[n], aligned[n], label_maps[n], primary[i].score, primary[i].box
            )
        return result


def region_crop(image: np.ndarray, mask: np.ndarray, margin: float = REGION_MARGIN) -> np.ndarray:
    """The region's bounding box (plus a margin), black outside the region.

    A bounding box rather than the whole blacked-out image (the training input): for a region as
    small as the eyes the whole image is nearly all black, and DINO would then compare layouts
    of black, not the region's appearance."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("empty region mask")
    y1, y2, x1, x2 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    dy, dx = int(round((y2 - y1) * margin)), int(round((x2 - x1) * margin))
    y1, x1 = max(0, y1 - dy), max(0, x1 - dx)
    y2, x2 = min(mask.shape[0], y2 + dy), min(mask.shape[1], x2 + dx)
    crop = image[y1:y2, x1:x2] * mask[y1:y2, x1:x2, None]
    return np.ascontiguousarray(crop.astype(np.uint8))


def region_crops(image: np.ndarray, label_map: np.ndarray) -> dict[str, np.ndarray]:
    """A crop for each of the five regions present in `label_map` (fgid's presence rule)."""
    if image.shape[:2] != label_map.shape:
        raise ValueError(f"image {image.shape[:2]} and label map {label_map.shape} differ")
    return {
        name: region_crop(image, region_mask(label_map, name))
        for name in regions_present(label_map)
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity; 0 when either vector is all zeros (a missing embedding)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else 0.0
