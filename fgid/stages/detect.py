"""Detect faces, keep a primary face per image, record how many were seen."""

from __future__ import annotations

from fgid.config import DetectConfig
from fgid.protocols import Detection, FaceDetector
from fgid.sample import Sample
from fgid.stages.base import Stage


def choose_primary(faces: list[Detection]) -> Detection:
    """The largest face wins (portrait datasets centre their subject); score breaks ties."""
    return max(faces, key=lambda f: (round(f.area, 1), f.score))


class DetectStage(Stage):
    name = "detect"

    def __init__(self, detector: FaceDetector, config: DetectConfig) -> None:
        super().__init__()
        self.detector, self.config = detector, config

    def process(self, samples: list[Sample]) -> None:
        found = self.detector.detect([s.image for s in samples])
        for sample, faces in zip(samples, found, strict=True):
            if self.config.min_score is not None:
                faces = [f for f in faces if f.score >= self.config.min_score]
            sample.face_count = len(faces)
            if not faces:
                sample.reject("no_face")
                continue
            if self.config.max_faces and len(faces) > self.config.max_faces:
                sample.reject("too_many_faces", f"{len(faces)} > {self.config.max_faces}")
                continue
            primary = choose_primary(faces)
            x1, y1, x2, y2 = primary.box
            side = min(x2 - x1, y2 - y1)
            if side < self.config.min_face_size:
                sample.reject("face_too_small", f"{side:.0f} px < {self.config.min_face_size}")
                continue
            sample.face = primary
