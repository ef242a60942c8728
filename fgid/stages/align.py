"""FFHQ-style alignment from five landmarks; the affine transform is kept so points map back."""

from __future__ import annotations

import cv2
import numpy as np

from fgid.config import AlignConfig
from fgid.sample import Sample
from fgid.stages.base import Stage


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop quadrilateral (4x2: top-left, bottom-left, bottom-right, top-right).

    Same construction as the FFHQ dataset script, which needs only eye centres and mouth corners,
    so five landmarks from any detector define it."""
    eye_left, eye_right, _, mouth_left, mouth_right = landmarks.astype(np.float64)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def align_transform(landmarks: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine matrix mapping source pixels onto the size x size aligned crop."""
    quad = ffhq_quad(landmarks)
    src = np.float32([quad[0], quad[1], quad[3]])
    dst = np.float32([[0, 0], [0, size], [size, 0]])
    return cv2.getAffineTransform(src, dst)


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    """Aligned -> source, to map boxes, landmarks or label maps back onto the photo."""
    return cv2.invertAffineTransform(matrix)


def align_face(
    image: np.ndarray, landmarks: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    matrix = align_transform(landmarks, size)
    # Shrinking by more than 2x with bilinear sampling aliases; pre-blur in proportion.
    scale = np.sqrt(abs(np.linalg.det(matrix[:, :2])))
    if scale < 0.5:
        sigma = 0.5 / scale * 0.5
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    aligned = cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    return aligned, matrix


class AlignStage(Stage):
    name = "align"

    def __init__(self, config: AlignConfig) -> None:
        super().__init__()
        self.config = config

    def process(self, samples: list[Sample]) -> None:
        for sample in samples:
            sample.aligned, sample.transform = align_face(
                sample.image, sample.face.landmarks, self.config.size
            )
            if sample.face.dense_landmarks is not None:
                sample.aligned_dense = apply_transform(
                    sample.transform, sample.face.dense_landmarks
                )
