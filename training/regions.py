"""Facial regions from a label map: masks, blacked-out region images, CLIP and ArcFace inputs.

A region is the set of CelebAMask-HQ classes in fgid.schema.REGIONS (FGID_SPEC §2); its image is
the whole aligned face with every pixel outside the region black, not a bounding-box crop, as
the reference loader builds it. (The reference fills each class's outer contour first and keeps
only one eye, one ear and the upper lip; this follows the spec's class sets exactly.) The
foreground is every non-background class, the reference's `WithoutBackground` mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from fgid.schema import REGIONS

# CLIPImageProcessor's defaults (OpenAI CLIP; also used by ViT-H/14 and ViT-bigG/14).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# insightface.utils.face_align.arcface_dst: where norm_crop puts the five landmarks in 112x112.
ARCFACE_SIZE = 112
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)

# class id -> bit i set when the class belongs to region i: one table lookup per pixel.
_REGION_BITS = np.zeros(256, dtype=np.uint8)
for _i, _classes in enumerate(REGIONS.values()):
    _REGION_BITS[list(_classes)] |= 1 << _i
_BIT = (1 << np.arange(len(REGIONS), dtype=np.uint8))[:, None, None]


def region_masks(label_map: np.ndarray) -> np.ndarray:
    """(5, H, W) bool, one mask per region in REGIONS order."""
    label_map = np.asarray(label_map)
    if label_map.dtype != np.uint8:
        raise ValueError(f"label map must be uint8 class ids, got {label_map.dtype}")
    return (_REGION_BITS[label_map][None] & _BIT) != 0


def foreground_mask(label_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: every pixel the parser did not call background."""
    return np.asarray(label_map) != 0


def region_images(image: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """(5, H, W, 3) uint8: the whole image once per region, black outside that region."""
    if image.shape[:2] != np.shape(label_map):
        raise ValueError(f"image {image.shape[:2]} and label map {np.shape(label_map)} differ")
    return image[None] * region_masks(label_map)[..., None].astype(np.uint8)


def resize_label_map(label_map: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize to size x size: every output pixel is one input pixel's class."""
    h, w = label_map.shape
    if (h, w) == (size, size):
        return label_map
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return label_map[rows[:, None], cols[None, :]]


def resize_images(images: np.ndarray, size: int, resample: int = Image.BILINEAR) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, size, size) in 0..255.

    Shorter side to `size`, then a centre crop, with PIL's antialiased filters: what
    CLIPImageProcessor (bicubic) and the reference's Resize + CenterCrop (bilinear) do."""
    images = np.asarray(images)
    lead, (h, w) = images.shape[:-3], images.shape[-3:-1]
    flat = images.reshape(-1, h, w, 3)
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        top, left = (nh - size) // 2, (nw - size) // 2
        box = (left, top, left + size, top + size)
        flat = np.stack(
            [np.asarray(Image.fromarray(im).resize((nw, nh), resample).crop(box)) for im in flat]
        )
    x = torch.from_numpy(np.ascontiguousarray(flat)).permute(0, 3, 1, 2).float()
    return x.reshape(*lead, 3, size, size)


def clip_preprocess(
    images: np.ndarray,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, size, size), CLIP-normalised (bicubic resize)."""
    x = resize_images(images, size, Image.BICUBIC) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t


def to_unit_range(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, size, size) in [-1, 1] (bilinear resize)."""
    return resize_images(images, size, Image.BILINEAR) / 127.5 - 1.0


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (rotation, uniform scale, shift) mapping src onto dst:
    Umeyama's closed form, the estimate insightface's norm_crop makes with scikit-image."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]]).astype(np.float32)


def arcface_crop(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(112, 112, 3) uint8: the face warped so its five landmarks (left eye, right eye, nose,
    left and right mouth corner, in `image` pixels) land on ARCFACE_TEMPLATE."""
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    return cv2.warpAffine(image, matrix, (ARCFACE_SIZE, ARCFACE_SIZE), borderValue=0.0)
