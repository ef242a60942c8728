"""The small model protocols every backend implements, so model sets swap by config.

Each protocol is batch-in, batch-out. A backend loads its weights once in its constructor;
the pipeline builds one instance per process and reuses it for every shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Detection:
    """One face found in a source image, in source-image pixel coordinates."""

    box: np.ndarray  # (4,) float32: x1, y1, x2, y2
    score: float
    landmarks: (
        np.ndarray
    )  # (5, 2) float32: eye (image left), eye (image right), nose, mouth left, mouth right
    # Backend-specific extra landmarks (dlib's 68 points); parsers that need them read them here.
    dense_landmarks: np.ndarray | None = None

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return float(max(0.0, x2 - x1) * max(0.0, y2 - y1))


@dataclass
class Attributes:
    age: float | None
    gender: str | None  # "male" | "female" | None
    extra: dict = field(default_factory=dict)


@runtime_checkable
class FaceDetector(Protocol):
    name: str

    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """RGB uint8 HxWx3 images -> all faces found in each, any order.

        Optional: a detector may also offer `prepare_batch(images)`, which the read-ahead thread
        calls on the next batch (letterboxing, host-side tensors) so `detect` finds it ready."""
        ...


@runtime_checkable
class FaceParser(Protocol):
    name: str
    # CelebAMask-HQ class ids this parser can never produce (e.g. ears for a landmark parser).
    unseen_classes: frozenset[int]

    def parse(
        self, aligned: list[np.ndarray], dense_landmarks: list[np.ndarray | None]
    ) -> list[np.ndarray]:
        """Aligned RGB crops (+ their dense landmarks in crop coordinates, if any) ->
        uint8 label maps of the same height and width, CelebAMask-HQ class ids."""
        ...


@runtime_checkable
class FaceEmbedder(Protocol):
    name: str
    dim: int

    def embed(self, images: list[np.ndarray], faces: list[Detection]) -> np.ndarray:
        """Source RGB images and the chosen face in each -> (N, dim) float32 identity embeddings.

        Each backend aligns the face the way its recognizer was trained (ArcFace 112x112 crop,
        dlib 150x150 chip), so it receives the source image, not our FFHQ-style crop."""
        ...


@runtime_checkable
class AttributeEstimator(Protocol):
    name: str

    def estimate(self, images: list[np.ndarray], faces: list[Detection]) -> list[Attributes]: ...


@runtime_checkable
class Captioner(Protocol):
    name: str

    def caption(self, images: list[np.ndarray], prompt: str, hints: list[dict]) -> list[str]:
        """Aligned RGB crops + one prompt -> one raw answer per image.

        `hints` carries what earlier stages found (age, gender, regions); a VLM ignores it, the
        template captioner is built from it.

        Optional: a captioner may also offer `caption_many(images, prompts, hints)` (one answer
        list per prompt), so an engine that batches across prompts gets them in one call."""
        ...


@dataclass
class ModelSet:
    """The backends one build uses, loaded once per process."""

    detector: FaceDetector
    parser: FaceParser
    embedder: FaceEmbedder
    attributes: AttributeEstimator
    captioner: Captioner

    def describe(self) -> dict[str, str]:
        """Model names (with versions where the backend knows them) for provenance."""
        return {
            "detector": self.detector.name,
            "parser": self.parser.name,
            "embedder": self.embedder.name,
            "attributes": self.attributes.name,
            "captioner": self.captioner.name,
        }
