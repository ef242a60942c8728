"""Evaluation metrics on real photos: known answers where they exist, real invariants where the
tiny random CLIP/DINO backbones can only show the plumbing is right."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from tests.photos import astronaut, grace_hopper


@pytest.fixture(scope="module")
def metric_models(tiny_clip, tiny_dino, lite_models):
    from training.evaluation.backbones import ClipScorer, DinoScorer
    from training.evaluation.facenet import FaceNetScorer, load_facenet
    from training.evaluation.faces import FaceAnalyzer
    from training.evaluation.fid import DinoFeatures
    from training.evaluation.metrics import MetricModels

    dino = DinoScorer.from_pretrained(str(tiny_dino), device="cpu")
    clip = ClipScorer.from_pretrained(str(tiny_clip), device="cpu")
    return MetricModels(
        clip, dino, FaceAnalyzer(lite_models), DinoFeatures(dino), FaceNetScorer(load_facenet(None))
    )


def hopper() -> np.ndarray:
    return np.asarray(Image.open(grace_hopper()).convert("RGB"))


def reference_from_photo(photo: np.ndarray, key: str, models) -> object:
    """A Reference made the way a build makes one: detect, align, parse and embed the photo."""
    from training.reference import Reference

    (face,) = models.faces.analyze([photo])
    assert face is not None
    return Reference(
        key=key,
        identity=f"person-{key}",
        image=face.aligned,
        label_map=face.label_map,
        embedding=face.embedding,
        landmarks=np.zeros((5, 2), np.float32),
        caption="",
        facial="",
        gender="female",
        age=40.0,
    )


@pytest.fixture(scope="module")
def astronaut_ref(metric_models):
    return reference_from_photo(astronaut(), "astronaut", metric_models)


@pytest.fixture(scope="module")
def hopper_ref(metric_models):
    return reference_from_photo(hopper(), "hopper", metric_models)


def test_identical_image_scores_full_similarity(metric_models, astronaut_ref):
    (row,) = metric_models.score([astronaut_ref], [astronaut_ref.image], ["a woman"])
    assert row["clip_i"] == pytest.approx(100, abs=1e-3)
    assert row["dino"] == pytest.approx(100, abs=1e-3)
    assert row["face_sim"] == pytest.approx(100, abs=1e-3)
    assert row["face_sim_arcface"] == pytest.approx(100, abs=1e-3)
    assert row["face_found"]
    # The generated side is re-detected, re-aligned and re-parsed, so the regions match closely
    # but not pixel for pixel. The lite parser never paints ears: they cannot be compared.
    assert row["fgis_regions"] == ["face", "eyes", "nose", "mouth"]
    assert 97 < row["fgis"] <= 100 + 1e-6
    assert -100 <= row["clip_t"] <= 100


def test_facesim_separates_people(metric_models, astronaut_ref):
    photo = Image.fromarray(astronaut())
    brighter = np.asarray(ImageEnhance.Brightness(photo).enhance(1.2))
    turned = np.asarray(photo.rotate(5, resample=Image.Resampling.BICUBIC))
    rows = metric_models.score([astronaut_ref] * 3, [brighter, turned, hopper()], ["a woman"] * 3)
    # The lite embedder is a trained recogniser; FaceNet here has random weights.
    same = [r["face_sim_arcface"] for r in rows[:2]]
    other = rows[2]["face_sim_arcface"]
    assert all(r["face_found"] for r in rows)
    assert min(same) > 97
    assert other < min(same) - 5


def test_no_face_scores_zero_identity(metric_models, astronaut_ref):
    blank = np.full((128, 128, 3), 127, np.uint8)
    (row,) = metric_models.score([astronaut_ref], [blank], ["a woman"])
    assert not row["face_found"]
    assert row["face_sim"] == 0.0 and row["fgis"] == 0.0 and row["fgis_regions"] == []
    assert row["clip_i"] < 100 and row["dino"] < 100  # still measured: they need no face


def test_a_batch_scores_like_its_items_alone(metric_models, astronaut_ref, hopper_ref):
    # Prompts of different token lengths are padded together in a batch; padding must not move
    # any score, and each image must be paired with its own reference.
    refs = [astronaut_ref, hopper_ref, astronaut_ref]
    images = [hopper_ref.image, astronaut_ref.image, np.full((64, 64, 3), 30, np.uint8)]
    prompts = [
        "a woman",
        "a painting of a woman in the style of Vincent Van Gogh",
        "a woman in a helmet and vest riding a motorcycle",
    ]
    batch = metric_models.score(refs, images, prompts)
    for ref, image, prompt, together in zip(refs, images, prompts, batch, strict=True):
        (alone,) = metric_models.score([ref], [image], [prompt])
        for metric in ("clip_t", "clip_i", "dino", "face_sim", "face_sim_arcface", "fgis"):
            assert together[metric] == pytest.approx(alone[metric], abs=1e-3), metric
    # Image-reference similarities are symmetric: hopper drawn for the astronaut scores what the
    # astronaut drawn for hopper scores.
    assert batch[0]["clip_i"] == pytest.approx(batch[1]["clip_i"], abs=1e-3)
    assert batch[0]["dino"] == pytest.approx(batch[1]["dino"], abs=1e-3)
    assert batch[0]["face_sim"] == pytest.approx(batch[1]["face_sim"], abs=1e-3)
    assert batch[0]["face_sim_arcface"] < 95


def test_clip_t_is_the_cosine_of_the_two_embeddings(metric_models, astronaut_ref):
    texts = ["a woman wearing a red hat", "a woman on the beach"]
    rows = metric_models.score([astronaut_ref] * 2, [astronaut_ref.image] * 2, texts)
    image = metric_models.clip.image_embeddings([astronaut_ref.image])[0]
    text = metric_models.clip.text_embeddings(texts)
    assert np.linalg.norm(text, axis=1) == pytest.approx([1, 1], abs=1e-5)
    for row, vector in zip(rows, text, strict=True):
        assert row["clip_t"] == pytest.approx(100 * float(image @ vector), abs=1e-3)
    assert rows[0]["clip_t"] != pytest.approx(rows[1]["clip_t"], abs=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_for_another_set(metric_models):
    from training.evaluation.fid import frechet_distance

    rng = np.random.default_rng(0)
    photos = [astronaut(), hopper()]
    faces = []
    for photo in photos:
        image = Image.fromarray(photo)
        for factor in (0.7, 0.85, 1.0, 1.15, 1.3):
            faces.append(np.asarray(ImageEnhance.Brightness(image).enhance(factor)))
    noise = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(10)]
    a = metric_models.fid_features(faces)
    b = metric_models.fid_features(noise)
    assert a.shape == (10, metric_models.dino.dim)
    assert abs(frechet_distance(a, a)) < 1e-3
    assert frechet_distance(a, b) > 1.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-4)
    assert math.isnan(frechet_distance(a[:1], b))


def test_region_crop_keeps_only_the_region():
    from training.evaluation.faces import region_crop

    image = np.full((100, 100, 3), 200, np.uint8)
    mask = np.zeros((100, 100), bool)
    mask[20:40, 50:90] = True  # 20 x 40 box: margins of 2 and 4 pixels
    mask[30, 50] = False
    crop = region_crop(image, mask, margin=0.1)
    assert crop.shape == (24, 48, 3)
    assert (crop[2:22, 4:44][mask[20:40, 50:90]] == 200).all()
    assert (crop[:2] == 0).all() and (crop[:, :4] == 0).all() and (crop[12, 4] == 0).all()
    with pytest.raises(ValueError):
        region_crop(image, np.zeros((100, 100), bool))


def test_prompts_file_and_class_words():
    from training.evaluation.prompts import class_word, load_prompts, parse_prompts

    prompts = load_prompts()
    assert len(prompts) == 45
    counts = {}
    for prompt in prompts:
        counts[prompt.category] = counts.get(prompt.category, 0) + 1
    assert counts == {"clothing": 10, "background": 10, "action": 15, "style": 10}
    assert [p.index for p in prompts] == list(range(45))
    assert prompts[0].text(class_word("male")) == "a man wearing a red hat"
    assert class_word("female") == "woman" and class_word(None) == "person"
    picked = load_prompts(categories=["style", "action"], per_category=2)
    assert [(p.category, p.index) for p in picked] == [
        ("action", 20),
        ("action", 21),
        ("style", 35),
        ("style", 36),
    ]
    with pytest.raises(ValueError, match="line 2"):
        parse_prompts("# header\nstyle a portrait without a placeholder\n")
    with pytest.raises(ValueError, match="categories"):
        load_prompts(categories=["food"])


def test_facenet_has_facenet_pytorchs_layout_and_drops_the_classifier(tmp_path):
    import torch

    from training.evaluation.facenet import InceptionResnetV1, load_facenet

    model = InceptionResnetV1()
    state = model.state_dict()
    assert len(state) == 714 and state["last_linear.weight"].shape == (512, 1792)
    assert state["repeat_2.9.branch1.1.conv.weight"].shape == (128, 128, 1, 7)
    released = {**state, "logits.weight": torch.zeros(8631, 512), "logits.bias": torch.zeros(8631)}
    torch.save(released, tmp_path / "20180402-114759-vggface2.pt")
    loaded = load_facenet(tmp_path / "20180402-114759-vggface2.pt")
    out = loaded(torch.randn(2, 3, 160, 160))
    assert out.shape == (2, 512)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
