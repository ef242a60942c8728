from __future__ import annotations

import numpy as np

from fgid.stages.align import align_face, apply_transform, ffhq_quad, invert_transform


def test_transform_maps_points_to_the_crop_and_back():
    landmarks = np.float32([[410, 300], [530, 310], [470, 380], [420, 440], [520, 446]])
    image = np.random.default_rng(0).integers(0, 255, (900, 1000, 3), dtype=np.uint8)
    aligned, matrix = align_face(image, landmarks, 256)
    assert aligned.shape == (256, 256, 3)
    in_crop = apply_transform(matrix, landmarks)
    back = apply_transform(invert_transform(matrix), in_crop)
    np.testing.assert_allclose(back, landmarks, atol=1e-3)
    # the quad's corners land on the crop's corners
    corners = apply_transform(matrix, ffhq_quad(landmarks).astype(np.float32))
    np.testing.assert_allclose(corners, [[0, 0], [0, 256], [256, 256], [256, 0]], atol=1e-2)


def test_pixels_follow_the_transform():
    """A bright dot on the nose lands where the transform says it does."""
    landmarks = np.float32([[200, 200], [300, 200], [250, 260], [210, 320], [290, 320]])
    image = np.zeros((600, 600, 3), dtype=np.uint8)
    image[255:266, 245:256] = 255
    aligned, matrix = align_face(image, landmarks, 512)
    expected = apply_transform(matrix, np.float32([[250, 260]]))[0]
    ys, xs = np.nonzero(aligned[..., 0] > 128)
    assert abs(xs.mean() - expected[0]) < 2 and abs(ys.mean() - expected[1]) < 2


def test_tilted_face_is_levelled():
    angle = np.deg2rad(25)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    upright = np.float32([[-50, -40], [50, -40], [0, 10], [-40, 60], [40, 60]])
    tilted = (upright @ rot.T + 300).astype(np.float32)
    _, matrix = align_face(np.zeros((600, 600, 3), np.uint8), tilted, 512)
    eyes = apply_transform(matrix, tilted[:2])
    assert abs(eyes[0, 1] - eyes[1, 1]) < 1e-3  # eyes level after alignment
