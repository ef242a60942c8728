"""The lite model set on real photos: faces found, regions on the right parts, honest captions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fgid.config import AlignConfig, DetectConfig
from fgid.sample import Sample
from fgid.schema import CAPTION_PROMPT, CLASS_ID, REGIONS
from fgid.stages.align import AlignStage
from fgid.stages.caption import CaptionStage
from fgid.stages.detect import DetectStage, choose_primary
from fgid.stages.identity import AttributeStage, EmbedStage
from fgid.stages.parse import ParseStage, region_image, region_mask, regions_unseen
from tests.photos import astronaut, grace_hopper, group_photo

# Measured by eye on skimage's astronaut (512x512): pupil centres and the middle of the lips.
ASTRONAUT_EYES = ((203, 102), (247, 104))
ASTRONAUT_MOUTH = (225, 140)
# Classes a landmark-drawn map may contain.
DRAWN = {
    CLASS_ID[n]
    for n in (
        "background",
        "skin",
        "l_brow",
        "r_brow",
        "l_eye",
        "r_eye",
        "nose",
        "mouth",
        "u_lip",
        "l_lip",
    )
}


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def processed(lite_models):
    """The astronaut and Grace Hopper through detect, align, parse, embed, attributes, captions."""
    samples = [Sample("astronaut", 0, "astronaut"), Sample("hopper", 0, "hopper")]
    samples[0].image, samples[1].image = astronaut(), rgb(grace_hopper())
    stages = [
        DetectStage(lite_models.detector, DetectConfig()),
        AlignStage(AlignConfig(size=512)),
        ParseStage(lite_models.parser),
        EmbedStage(lite_models.embedder),
        AttributeStage(lite_models.attributes),
        CaptionStage(lite_models.captioner),
    ]
    for stage in stages:
        stage(samples)
    assert all(s.ok for s in samples), [s.reason for s in samples]
    return dict(zip(("astronaut", "hopper"), samples, strict=True))


def inside(point, box) -> bool:
    x, y = point
    x1, y1, x2, y2 = box
    return x1 <= x <= x2 and y1 <= y <= y2


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max(), ys.max()


def test_detector_finds_the_astronaut_where_she_is(lite_models):
    faces = lite_models.detector.detect([astronaut()])[0]
    face = choose_primary(faces)
    for point in (*ASTRONAUT_EYES, ASTRONAUT_MOUTH):
        assert inside(point, face.box)
    assert inside(face.box[:2], (160, 60, 200, 100))  # top-left corner
    assert inside(face.box[2:], (250, 150, 290, 190))  # bottom-right corner
    eye_left, eye_right, nose, mouth_left, mouth_right = face.landmarks
    assert np.linalg.norm(eye_left - ASTRONAUT_EYES[0]) < 8
    assert np.linalg.norm(eye_right - ASTRONAUT_EYES[1]) < 8
    assert eye_left[1] < nose[1] < (mouth_left[1] + mouth_right[1]) / 2
    assert face.dense_landmarks.shape == (68, 2)


def test_detector_finds_everyone_in_the_group_photo(lite_models):
    faces = lite_models.detector.detect([rgb(group_photo())])[0]
    assert len(faces) >= 5
    # Distinct people, not one face found twice.
    centres = np.array(
        [((x1 + x2) / 2, (y1 + y2) / 2) for x1, y1, x2, y2 in (f.box for f in faces)]
    )
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(faces)) * 1e9
    assert gaps.min() > 100


def test_detector_finds_no_face_in_a_photo_of_coffee(lite_models):
    import skimage.data

    assert lite_models.detector.detect([skimage.data.coffee()])[0] == []


def test_embedder_accepts_strided_views(lite_models):
    image = astronaut()
    view = image[:, ::-1]  # a flip without a copy, as a cropping or flipping caller would pass
    face = choose_primary(lite_models.detector.detect([view])[0])
    from_view = lite_models.embedder.embed([view], [face])
    from_copy = lite_models.embedder.embed([np.ascontiguousarray(view)], [face])
    assert from_view.shape == (1, 128)
    assert np.allclose(from_view, from_copy)


def test_same_person_close_different_people_far(processed, lite_models):
    astro, hopper = processed["astronaut"].embedding, processed["hopper"].embedding
    assert np.linalg.norm(astro - hopper) > 0.6  # dlib's "different person" side
    flipped = astronaut()[:, ::-1]
    face = choose_primary(lite_models.detector.detect([flipped])[0])
    mirror = lite_models.embedder.embed([flipped], [face])[0]
    assert np.linalg.norm(astro - mirror) < 0.4


def test_regions_are_stacked_eyes_nose_mouth(processed):
    label_map = processed["astronaut"].label_map
    eyes, nose, mouth = (centroid(region_mask(label_map, r)) for r in ("eyes", "nose", "mouth"))
    assert eyes[1] < nose[1] < mouth[1]
    # Upright and centred in the FFHQ-style crop.
    size = label_map.shape[0]
    assert abs(eyes[0] - size / 2) < size * 0.08 and abs(mouth[0] - size / 2) < size * 0.08
    assert eyes[1] < size / 2 < mouth[1]


def test_eye_pixels_are_darker_than_skin(processed):
    sample = processed["astronaut"]
    luma = np.asarray(Image.fromarray(sample.aligned).convert("L"), dtype=np.float64)
    eyes = luma[region_mask(sample.label_map, "eyes")].mean()
    skin = luma[region_mask(sample.label_map, "face")].mean()
    assert eyes < skin - 20


def test_regions_lie_inside_the_face(processed):
    label_map = processed["astronaut"].label_map
    fx1, fy1, fx2, fy2 = bbox(region_mask(label_map, "face"))
    for region in ("eyes", "nose", "mouth"):
        x1, y1, x2, y2 = bbox(region_mask(label_map, region))
        assert fx1 <= x1 and fy1 <= y1 and x2 <= fx2 and y2 <= fy2, region
    # Two eyes: one on each side of the nose.
    nose_x = centroid(region_mask(label_map, "nose"))[0]
    left, right = (centroid(label_map == CLASS_ID[c])[0] for c in ("l_eye", "r_eye"))
    assert min(left, right) < nose_x < max(left, right)


def test_parser_writes_only_classes_it_can_see(processed, lite_models):
    parser = lite_models.parser
    for sample in processed.values():
        classes = set(np.unique(sample.label_map).tolist())
        assert classes <= DRAWN
        assert not classes & parser.unseen_classes
        assert sample.label_map.dtype == np.uint8
        assert sample.label_map.shape == sample.aligned.shape[:2]
        assert sample.regions == ["face", "eyes", "nose", "mouth"]
    assert set(REGIONS["ears"]) <= parser.unseen_classes
    assert regions_unseen(parser) == ["ears"]


@pytest.mark.parametrize("region", list(REGIONS))
def test_region_image_is_the_image_inside_black_outside(processed, region):
    sample = processed["astronaut"]
    mask = region_mask(sample.label_map, region)
    out = region_image(sample.aligned, sample.label_map, region)
    assert out.shape == sample.aligned.shape and out.dtype == sample.aligned.dtype
    assert (out[~mask] == 0).all()
    assert np.array_equal(out[mask], sample.aligned[mask])
    if region == "ears":
        assert not mask.any()  # never drawn by the lite parser
    else:
        assert out[mask].any()


def test_template_captions_are_marked_and_use_the_estimates(processed, lite_models):
    from fgid.backends.lite.template_captioner import MARK, person_noun

    for sample in processed.values():
        attrs = sample.attributes
        assert attrs.gender in ("male", "female") and 1 <= attrs.age <= 100
        assert sample.caption.startswith(MARK) and sample.facial.startswith(MARK)
        noun = person_noun(attrs.gender, attrs.age)
        assert f" {noun}," in sample.caption
        assert f"about {round(attrs.age)} years old" in sample.caption
        assert "two eyes" in sample.facial and "one nose" in sample.facial
        assert "ears" not in sample.facial  # not located, so not claimed
    astro = processed["astronaut"]
    assert astro.attributes.gender == "female"
    assert "woman" in astro.caption
    # The gender in the caption follows the estimate, whatever it is.
    flipped = lite_models.captioner.caption(
        [astro.aligned], CAPTION_PROMPT, [{"gender": "male", "age": 40.0, "face_count": 1}]
    )[0]
    assert " man," in flipped and "woman" not in flipped
