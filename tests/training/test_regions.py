"""Region masks, region images, CLIP inputs and the ArcFace crop, on samples of a real build."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fgid.schema import REGIONS
from training.reference import decode_sample
from training.regions import (
    ARCFACE_TEMPLATE,
    CLIP_MEAN,
    CLIP_STD,
    arcface_crop,
    clip_preprocess,
    foreground_mask,
    region_images,
    region_masks,
    resize_label_map,
    similarity_transform,
    to_unit_range,
)
from training.stream import webdataset


@pytest.fixture(scope="module")
def samples(built_dataset):
    """(Reference, sample json) for every sample of the build."""
    found = []
    for raw in webdataset(str(built_dataset)):
        members = {k: v for k, v in raw.items() if not k.startswith("__")}
        found.append((decode_sample(members, raw["__key__"], "-"), json.loads(members["json"])))
    assert len(found) == 11
    return found


def test_region_masks_are_the_label_map_classes(samples):
    for ref, meta in samples:
        label = ref.label_map
        masks = region_masks(label)
        assert masks.shape == (5, *label.shape) and masks.dtype == bool
        for mask, (name, classes) in zip(masks, REGIONS.items(), strict=True):
            assert mask.sum() == sum(int((label == c).sum()) for c in classes), name
            assert set(np.unique(label[mask])) <= set(classes)
        # Presence as the build recorded it.
        recorded = meta["regions"]["present"]
        assert [bool(m.any()) for m in masks] == [name in recorded for name in REGIONS]
        assert not (masks.sum(0) > 1).any()  # regions never overlap
        fg = foreground_mask(label)
        assert fg.sum() == (label > 0).sum() and fg[masks.any(0)].all()
    eyes = region_masks(samples[0][0].label_map)[1]
    assert {4, 5} <= set(np.unique(samples[0][0].label_map[eyes]))  # both eyes


def test_region_images_black_out_everything_else(samples):
    ref, _ = samples[0]
    images = region_images(ref.image, ref.label_map)
    masks = region_masks(ref.label_map)
    assert images.shape == (5, *ref.image.shape) and images.dtype == np.uint8
    for image, mask in zip(images, masks, strict=True):
        assert (image[~mask] == 0).all()
        assert np.array_equal(image[mask], ref.image[mask])
    assert images[0].any() and not images[2].any()  # face present; ears unseen by this parser
    with pytest.raises(ValueError):
        region_images(ref.image, ref.label_map[:-1])


def test_label_map_resize_keeps_classes(samples):
    label = samples[0][0].label_map
    assert resize_label_map(label, label.shape[0]) is label
    half = resize_label_map(label, label.shape[0] // 2)
    assert np.array_equal(half, label[1::2, 1::2])
    small = resize_label_map(label, 64)
    assert small.shape == (64, 64) and set(np.unique(small)) <= set(np.unique(label))


def test_clip_preprocess_matches_clip_image_processor(samples):
    from transformers import CLIPImageProcessor

    ref, _ = samples[3]
    views = np.concatenate([ref.image[None], region_images(ref.image, ref.label_map)])
    ours = clip_preprocess(views, 224, CLIP_MEAN, CLIP_STD)
    assert ours.shape == (6, 3, 224, 224) and ours.dtype == torch.float32
    processor = CLIPImageProcessor()
    theirs = processor(images=[Image.fromarray(v) for v in views], return_tensors="pt").pixel_values
    # Same filters and rounding; one 8-bit step is 1/255/std ~= 0.015.
    assert (ours - theirs).abs().max() < 0.04
    assert (ours - theirs).abs().mean() < 0.005
    # Leading dimensions are kept.
    assert clip_preprocess(views.reshape(2, 3, *views.shape[1:]), 32).shape == (2, 3, 3, 32, 32)


def test_unit_range_resize(samples):
    ref, _ = samples[0]
    x = to_unit_range(ref.image, 64)
    assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
    pil = np.array(Image.fromarray(ref.image).resize((64, 64), Image.BILINEAR))
    assert torch.equal(x, torch.from_numpy(pil).permute(2, 0, 1).float() / 127.5 - 1)
    same = to_unit_range(ref.image, ref.image.shape[0])
    assert torch.allclose((same + 1) * 127.5, torch.from_numpy(ref.image).permute(2, 0, 1).float())


def test_similarity_transform_recovers_a_known_one():
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = ARCFACE_TEMPLATE @ rot.T + shift
    back = similarity_transform(moved, ARCFACE_TEMPLATE)
    assert np.allclose(moved @ back[:, :2].T + back[:, 2], ARCFACE_TEMPLATE, atol=1e-3)


def test_arcface_crop_puts_the_eyes_on_the_template(samples):
    from skimage.transform import SimilarityTransform

    for ref, meta in samples:
        matrix = similarity_transform(ref.landmarks, ARCFACE_TEMPLATE)
        # insightface's norm_crop estimates the same transform with scikit-image.
        expected = SimilarityTransform.from_estimate(ref.landmarks, ARCFACE_TEMPLATE)
        assert np.allclose(matrix, expected.params[:2], atol=1e-3)
        mapped = ref.landmarks @ matrix[:, :2].T + matrix[:, 2]
        eye_error = np.hypot(*(mapped[:2] - ARCFACE_TEMPLATE[:2]).T)
        assert eye_error.max() < 6.0, ref.key  # five points, one similarity: not exact
        assert mapped[0, 0] < mapped[2, 0] < mapped[1, 0]  # left eye, nose, right eye
        crop = arcface_crop(ref.image, ref.landmarks)
        assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
        # The aligned landmarks are right: warping the source photo straight through
        # source -> aligned -> crop gives the same pixels.
        source = np.asarray(Image.open(meta["source"]).convert("RGB"))
        aligned = np.vstack([np.asarray(meta["aligned"]["transform"]), [0, 0, 1]])
        direct = cv2.warpAffine(source, matrix.astype(np.float64) @ aligned, (112, 112))
        assert np.corrcoef(direct.ravel(), crop.ravel())[0, 1] > 0.99
        assert np.abs(direct.astype(float) - crop).mean() < 4
