"""A region parser drawn from dlib's 68 landmarks, writing CelebAMask-HQ class ids.

It paints skin, brows, eyes, nose, lips and inner mouth. Landmarks say nothing about ears, hair,
neck, clothes or accessories, so those classes are listed in `unseen_classes` and never written:
their absence in a lite build means "not looked for", and the sample JSON says so.
"""

from __future__ import annotations

import cv2
import numpy as np

from fgid.schema import CLASS_ID

JAW = slice(0, 17)
BROW_IMAGE_LEFT, BROW_IMAGE_RIGHT = slice(17, 22), slice(22, 27)
NOSE = slice(27, 36)
EYE_IMAGE_LEFT, EYE_IMAGE_RIGHT = slice(36, 42), slice(42, 48)
OUTER_LIP, INNER_LIP = slice(48, 60), slice(60, 68)

UNSEEN = frozenset(
    CLASS_ID[name]
    for name in (
        "eyeglasses",
        "l_ear",
        "r_ear",
        "earring",
        "neck",
        "necklace",
        "cloth",
        "hair",
        "hat",
    )
)


def _poly(points: np.ndarray) -> np.ndarray:
    return np.round(points).astype(np.int32).reshape(-1, 1, 2)


def paint_label_map(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """68 landmarks (aligned-crop coordinates) -> uint8 label map of `size` (h, w)."""
    label = np.zeros(size, dtype=np.uint8)
    eyes_mid = (points[EYE_IMAGE_LEFT].mean(0) + points[EYE_IMAGE_RIGHT].mean(0)) / 2
    mouth_mid = points[OUTER_LIP].mean(0)
    up = (eyes_mid - mouth_mid) / max(np.linalg.norm(eyes_mid - mouth_mid), 1e-6)
    face_scale = np.linalg.norm(points[16] - points[0])
    # The forehead is not landmarked: lift the brows by about a third of the face width.
    forehead = np.concatenate([points[BROW_IMAGE_LEFT], points[BROW_IMAGE_RIGHT]]) + up * (
        0.3 * face_scale
    )
    skin = cv2.convexHull(_poly(np.concatenate([points[JAW], forehead])))
    cv2.fillPoly(label, [skin], CLASS_ID["skin"])

    cv2.fillPoly(label, [cv2.convexHull(_poly(points[NOSE]))], CLASS_ID["nose"])
    brow_width = max(2, int(round(0.025 * face_scale)))
    cv2.polylines(label, [_poly(points[BROW_IMAGE_LEFT])], False, CLASS_ID["l_brow"], brow_width)
    cv2.polylines(label, [_poly(points[BROW_IMAGE_RIGHT])], False, CLASS_ID["r_brow"], brow_width)
    cv2.fillPoly(label, [_poly(points[EYE_IMAGE_LEFT])], CLASS_ID["l_eye"])
    cv2.fillPoly(label, [_poly(points[EYE_IMAGE_RIGHT])], CLASS_ID["r_eye"])

    upper_lip = np.concatenate([points[48:55], points[60:65][::-1]])
    lower_lip = np.concatenate([points[54:60], points[48:49], points[60:61], points[64:68][::-1]])
    cv2.fillPoly(label, [_poly(upper_lip)], CLASS_ID["u_lip"])
    cv2.fillPoly(label, [_poly(lower_lip)], CLASS_ID["l_lip"])
    cv2.fillPoly(label, [_poly(points[INNER_LIP])], CLASS_ID["mouth"])
    return label


class LandmarkParser:
    name = "fgid-landmark-parser-v1"
    unseen_classes = UNSEEN

    def parse(
        self, aligned: list[np.ndarray], dense_landmarks: list[np.ndarray | None]
    ) -> list[np.ndarray]:
        maps = []
        for image, points in zip(aligned, dense_landmarks, strict=True):
            if points is None or len(points) != 68:
                raise ValueError("the landmark parser needs 68-point landmarks (lite detector)")
            maps.append(paint_label_map(points, image.shape[:2]))
        return maps
