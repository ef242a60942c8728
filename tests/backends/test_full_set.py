"""The full model set's loading and inference code, run on tiny models saved under real names."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from fgid.config import BuildConfig
from fgid.protocols import (
    AttributeEstimator,
    Captioner,
    FaceDetector,
    FaceEmbedder,
    FaceParser,
    ModelSet,
)
from fgid.schema import CAPTION_PROMPT, FACIAL_PROMPT
from tests.tiny_full_models import (
    build_bisenet_weights,
    build_insightface_pack,
    build_tiny_llava,
    expected_face,
)

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No test here may reach a model hub: only the local tmp dirs exist."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        # huggingface_hub reads the variable once, at import.
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("full-weights")
    return {
        "insightface": build_insightface_pack(root / "insightface"),
        "facexlib": build_bisenet_weights(root / "facexlib"),
        "llava": build_tiny_llava(root / "llava"),
    }


def full_config(weights: dict[str, Path], **overrides: object) -> BuildConfig:
    settings = {
        "models.set": "full",
        "models.insightface_root": str(weights["insightface"]),
        "models.facexlib_root": str(weights["facexlib"]),
        "models.llava": str(weights["llava"]),
        "models.device": "cpu",
        "caption.max_new_tokens": MAX_NEW_TOKENS,
    }
    settings.update(overrides)
    return BuildConfig().with_overrides(**settings)


@pytest.fixture(scope="module")
def models(weights) -> ModelSet:
    from fgid.backends import full

    return full.load(full_config(weights))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import insightface

    group = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    bgr = cv2.imread(str(group))
    assert bgr is not None, group
    astronaut = data.astronaut()
    return {
        "astronaut": astronaut,
        "group": np.ascontiguousarray(bgr[:, :, ::-1]),
        # Aligned-crop stand-ins of two sizes, as the parser and captioner receive them.
        "crop384": np.ascontiguousarray(astronaut[:384, 64:448]),
        "crop256": cv2.resize(astronaut[:320, 96:416], (256, 256)),
    }


def test_load_returns_a_model_set_that_meets_the_protocols(models):
    assert isinstance(models, ModelSet)
    assert isinstance(models.detector, FaceDetector)
    assert isinstance(models.parser, FaceParser)
    assert isinstance(models.embedder, FaceEmbedder)
    assert isinstance(models.attributes, AttributeEstimator)
    assert isinstance(models.captioner, Captioner)
    names = models.describe()
    assert names["detector"] == "insightface:buffalo_l/det_10g.onnx"
    assert names["embedder"] == "insightface:buffalo_l/w600k_r50.onnx"
    assert names["attributes"] == "insightface:buffalo_l/genderage.onnx"
    assert names["parser"] == "facexlib-bisenet"
    assert names["captioner"] == "llava:tiny-llava"
    assert models.embedder.dim == 512


def test_detector_reports_the_planted_face_in_source_pixels(models, photos):
    flat = np.full((400, 400, 3), 128, np.uint8)  # square: fills the canvas, so no texture
    astronaut, group, nothing = models.detector.detect([photos["astronaut"], photos["group"], flat])
    assert nothing == []
    for image, faces in ((photos["astronaut"], astronaut), (photos["group"], group)):
        assert len(faces) == 1
        want = expected_face(image.shape)
        face = faces[0]
        assert face.box.dtype == np.float32 and face.box.shape == (4,)
        assert face.landmarks.dtype == np.float32 and face.landmarks.shape == (5, 2)
        np.testing.assert_allclose(face.box, want["box"], atol=0.5)
        np.testing.assert_allclose(face.landmarks, want["landmarks"], atol=0.5)
        assert face.score == pytest.approx(want["score"], abs=1e-3)
        # Detection's documented order: image-left eye first, mouth below the eyes.
        assert face.landmarks[0, 0] < face.landmarks[1, 0]
        assert face.landmarks[3, 1] > face.landmarks[0, 1]


def test_detector_honours_det_size(weights, photos):
    from fgid.backends.full.insightface_models import InsightFaceDetector, model_dir

    config = full_config(weights, **{"detect.det_size": (320, 320)})
    pack = model_dir(config, ("det_10g.onnx",))
    detector = InsightFaceDetector(pack, ["CPUExecutionProvider"], config)
    [faces] = detector.detect([photos["astronaut"]])
    want = expected_face(photos["astronaut"].shape, (320, 320))
    np.testing.assert_allclose(faces[0].box, want["box"], atol=0.5)


def test_embedder_returns_unit_norm_batched_embeddings(models, photos):
    images = [photos["astronaut"], photos["group"], photos["astronaut"]]
    faces = [d[0] for d in models.detector.detect(images)]
    emb = models.embedder.embed(images, faces)
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1], atol=1e-3)  # different faces, different identities
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-6)
    # One ONNX call for the batch gives what one call per face gives.
    single = models.embedder.embed(images[1:2], faces[1:2])
    np.testing.assert_allclose(single[0], emb[1], atol=1e-5)
    assert models.embedder.embed([], []).shape == (0, 512)


def test_attributes_give_gender_and_age_per_face(models, photos):
    images = [photos["astronaut"], photos["group"]]
    faces = [d[0] for d in models.detector.detect(images)]
    attrs = models.attributes.estimate(images, faces)
    assert len(attrs) == 2
    for a in attrs:
        assert a.gender in {"male", "female"}
        assert isinstance(a.age, float) and 0.0 <= a.age <= 100.0
    single = models.attributes.estimate(images[1:], faces[1:])
    assert (single[0].gender, single[0].age) == (attrs[1].gender, attrs[1].age)
    assert models.attributes.estimate([], []) == []


def test_parser_returns_label_maps_of_the_crop_size(models, photos):
    crops = [photos["crop384"], photos["crop256"]]
    maps = models.parser.parse(crops, [None, None])
    assert models.parser.unseen_classes == frozenset()
    assert len(maps) == 2
    for crop, labels in zip(crops, maps, strict=True):
        assert labels.shape == crop.shape[:2]
        assert labels.dtype == np.uint8
        assert labels.max() <= 18
    again = models.parser.parse(crops[1:], [None])
    np.testing.assert_array_equal(again[0], maps[1])


def test_captioner_answers_each_image_deterministically(models, photos):
    crops = [photos["crop384"], photos["crop256"], photos["astronaut"]]
    for prompt in (CAPTION_PROMPT, FACIAL_PROMPT):
        answers = models.captioner.caption(crops, prompt, [{}] * 3)
        assert len(answers) == 3
        assert all(isinstance(a, str) for a in answers)
        # The tiny tokenizer has one character per token, so the length bounds the tokens.
        assert all(len(a) <= MAX_NEW_TOKENS for a in answers)
        assert models.captioner.caption(crops, prompt, [{}] * 3) == answers
        assert len(set(answers)) > 1, "answers should depend on the image"


def test_captioner_batching_and_token_budget(models, weights, photos):
    from fgid.backends.full.llava import LlavaCaptioner

    crops = [photos["crop384"], photos["crop256"], photos["astronaut"]]
    one_by_one = LlavaCaptioner(full_config(weights, **{"caption.batch_size": 1}), "cpu")
    batched = models.captioner.caption(crops, FACIAL_PROMPT, [{}] * 3)
    assert one_by_one.caption(crops, FACIAL_PROMPT, [{}] * 3) == batched
    long = LlavaCaptioner(full_config(weights, **{"caption.max_new_tokens": 24}), "cpu")
    short = LlavaCaptioner(
        full_config(weights, **{"caption.max_new_tokens": 4, "caption.batch_size": 2}), "cpu"
    )
    long_answers = long.caption(crops, CAPTION_PROMPT, [{}] * 3)
    short_answers = short.caption(crops, CAPTION_PROMPT, [{}] * 3)
    assert len(short_answers) == 3
    for s, full_answer in zip(short_answers, long_answers, strict=True):
        assert len(s) <= 4
        # Greedy decoding: a smaller budget stops early on the same path.
        assert full_answer.startswith(s)


def test_missing_weights_fail_fast_and_name_the_file(weights, tmp_path):
    from fgid.backends import full

    started = time.monotonic()
    cases = {
        "models.insightface_root": "det_10g.onnx",
        "models.facexlib_root": "parsing_bisenet.pth",
        "models.llava": "no-such-llava",
    }
    for key, named in cases.items():
        missing = tmp_path / ("no-such-llava" if key == "models.llava" else "empty")
        with pytest.raises(FileNotFoundError, match=named):
            full.load(full_config(weights, **{key: str(missing)}))
    assert time.monotonic() - started < 30


def test_default_insightface_root_is_the_home_dir(weights, tmp_path, monkeypatch):
    from fgid.backends.full.insightface_models import model_dir

    # InsightFace's default root is ~/.insightface; a pack already there is used, not downloaded.
    monkeypatch.setenv("HOME", str(tmp_path))
    build_insightface_pack(tmp_path / ".insightface")
    config = full_config(weights, **{"models.insightface_root": None})
    pack = model_dir(config, ("det_10g.onnx", "w600k_r50.onnx", "genderage.onnx"))
    assert pack == tmp_path / ".insightface" / "models" / "buffalo_l"
