"""Identity embedding and age/gender for the primary face of each image."""

from __future__ import annotations

import numpy as np

from fgid.protocols import AttributeEstimator, FaceEmbedder
from fgid.sample import Sample
from fgid.stages.base import Stage


class EmbedStage(Stage):
    name = "embed"

    def __init__(self, embedder: FaceEmbedder) -> None:
        super().__init__()
        self.embedder = embedder

    def process(self, samples: list[Sample]) -> None:
        vectors = self.embedder.embed([s.image for s in samples], [s.face for s in samples])
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(samples), self.embedder.dim):
            raise ValueError(f"embedder returned {vectors.shape}, expected dim {self.embedder.dim}")
        for sample, vector in zip(samples, vectors, strict=True):
            sample.embedding = vector


class AttributeStage(Stage):
    name = "attributes"

    def __init__(self, estimator: AttributeEstimator) -> None:
        super().__init__()
        self.estimator = estimator

    def process(self, samples: list[Sample]) -> None:
        found = self.estimator.estimate([s.image for s in samples], [s.face for s in samples])
        for sample, attributes in zip(samples, found, strict=True):
            sample.attributes = attributes
