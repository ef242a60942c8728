"""Batched SCRFD detection gives InsightFace's own per-image `detect` results, exactly."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from fgid.backends.full.insightface_models import (
    DETECTOR_FILE,
    InsightFaceDetector,
    model_dir,
    scrfd_batchable,
)
from fgid.config import BuildConfig, DetectConfig
from fgid.protocols import ModelSet
from fgid.sample import Sample
from fgid.stages.detect import DetectStage
from tests.tiny_full_models import build_bisenet_weights, build_insightface_pack

CPU = ["CPUExecutionProvider"]


def config_for(root: Path, **detect: object) -> BuildConfig:
    return BuildConfig(
        models={"set": "full", "insightface_root": str(root), "device": "cpu"}, detect=detect
    )


def detector(root: Path, **detect: object) -> InsightFaceDetector:
    config = config_for(root, **detect)
    return InsightFaceDetector(model_dir(config, (DETECTOR_FILE,)), CPU, config)


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packs")
    return {
        "fixed": build_insightface_pack(root / "fixed"),
        "batched": build_insightface_pack(root / "batched", batched_detector=True),
    }


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Photos of several sizes and shapes (each letterboxed differently) and a flat image."""
    import insightface

    astronaut = data.astronaut()
    group = cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"))
    return [
        astronaut,  # 512x512
        np.ascontiguousarray(group[:, :, ::-1]),  # 1280x...
        np.ascontiguousarray(astronaut[:300, 150:250]),  # tall
        cv2.resize(astronaut, (900, 200)),  # wide
        cv2.resize(astronaut, (90, 70)),  # small: scaled up
        np.full((300, 300, 3), 128, np.uint8),  # no texture: no face
    ]


def per_image(det: InsightFaceDetector, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """InsightFace's own SCRFD.detect on one image (it takes BGR)."""
    return det.model.detect(np.ascontiguousarray(image[:, :, ::-1]), input_size=det.det_size)


def assert_same_faces(faces, reference) -> None:
    boxes, kpss = reference
    assert len(faces) == boxes.shape[0]
    for face, box, kps in zip(faces, boxes, kpss, strict=True):
        np.testing.assert_array_equal(face.box, box[:4])
        assert face.score == float(box[4])
        np.testing.assert_array_equal(face.landmarks, kps)


def test_a_fixed_batch_model_runs_one_image_a_call(packs):
    det = detector(packs["fixed"])
    assert det.model.input_shape[0] == 1 and not scrfd_batchable(det.model)
    assert not det.batched


@pytest.mark.parametrize(
    "detect",
    [
        {},  # SCRFD's own threshold: one face per photo
        # Every anchor is a candidate (ties, all strides): sorting and NMS decide the faces.
        {"min_score": 0.0, "det_size": (160, 160)},
    ],
    ids=["default-threshold", "every-anchor"],
)
def test_batched_detection_equals_insightface_per_image_detect(packs, images, detect):
    det = detector(packs["batched"], **detect)
    assert det.batched
    found = det.detect(images)
    assert [len(faces) > 0 for faces in found] == [True] * 5 + [detect != {}]
    for image, faces in zip(images, found, strict=True):
        assert_same_faces(faces, per_image(det, image))
    # The batch-1 export of the same graph, through InsightFace alone, agrees too.
    fixed = detector(packs["fixed"], **detect)
    for image, faces in zip(images, found, strict=True):
        assert_same_faces(faces, per_image(fixed, image))


def test_batches_prepared_ahead_give_the_same_faces(packs, images):
    det = detector(packs["batched"])
    fresh = det.detect(images)
    det.prepare_batch(images)
    again = det.detect(list(images))  # a new list of the same image objects, as a stage passes
    for a, b in zip(fresh, again, strict=True):
        assert [(f.box.tolist(), f.score, f.landmarks.tolist()) for f in a] == [
            (f.box.tolist(), f.score, f.landmarks.tolist()) for f in b
        ]


def test_an_image_that_cannot_be_letterboxed_costs_only_its_sample(packs, images):
    det = detector(packs["batched"])
    # A 64 x 50000 panorama passes decoding, but fits the canvas 0 pixels high.
    sliver = np.random.default_rng(0).integers(0, 256, (64, 50_000, 3), dtype=np.uint8)
    batch = [Sample("photo", 0, "photo"), Sample("sliver", 0, "sliver")]
    batch[0].image, batch[1].image = images[0], sliver
    det.prepare_batch([s.image for s in batch])  # never raises: detect meets the error
    DetectStage(det, DetectConfig(min_face_size=8))(batch)
    assert batch[0].ok and batch[0].face is not None
    assert batch[1].reason.startswith("stage_error: detect:")


def test_a_model_whose_batch_mixes_images_falls_back(packs, images, tmp_path):
    """A declared free batch axis over a graph that pools over the whole batch (as exports made
    for one image do) is caught at load: detection stays per image and right."""
    import onnx

    model = onnx.load(str(model_dir(config_for(packs["batched"]), ()) / DETECTOR_FILE))
    for node in model.graph.node:
        if node.name in ("det_mean", "det_var"):  # the variance gate, now over the batch
            kept = [a for a in node.attribute if a.name != "axes"]
            del node.attribute[:]
            node.attribute.extend(kept)
    root = build_insightface_pack(tmp_path / "mixing")
    onnx.save(model, str(root / "models" / "buffalo_l" / DETECTOR_FILE))
    det = detector(root)
    assert scrfd_batchable(det.model) and not det.batched
    for image, faces in zip(images, det.detect(images), strict=True):
        assert_same_faces(faces, per_image(det, image))


def test_shards_are_byte_identical_with_the_batched_detector(
    packs, demo_inputs, tmp_path, lite_models
):
    """A build through the batched detector writes the bytes the per-image one writes."""
    from fgid.backends.full.bisenet import BiSeNetParser
    from fgid.backends.full.insightface_models import InsightFaceAttributes, InsightFaceEmbedder
    from fgid.dataset import Dataset
    from fgid.pipeline import prepare_output, process_shard

    config = config_for(packs["fixed"], min_face_size=8).model_copy(
        update={"shard_size": 2, "batch_size": 2, "prefetch_batches": 2}
    )
    config = config.with_overrides(
        **{"models.facexlib_root": str(build_bisenet_weights(tmp_path / "facexlib"))}
    )
    pack = model_dir(config, ())
    shared = {
        "parser": BiSeNetParser(config, "cpu"),
        "embedder": InsightFaceEmbedder(pack, CPU, config),
        "attributes": InsightFaceAttributes(pack, CPU, config),
        "captioner": lite_models.captioner,  # captions are not what this compares
    }
    inputs = [str(demo_inputs / n) for n in ("astronaut.png", "group-t1.jpg", "notes.jpg")]
    outputs = {}
    for kind in ("fixed", "batched"):
        det = InsightFaceDetector(model_dir(config_for(packs[kind]), ()), CPU, config)
        assert det.batched == (kind == "batched")
        out = tmp_path / kind
        models = ModelSet(detector=det, **shared)
        prepare_output(inputs, out, config)
        stats = [process_shard(p, out, config, models) for p in Dataset(out).read_plan()]
        assert sum(s["ok"] for s in stats) == 2 and sum(s["rejected"] for s in stats) == 1
        shards = sorted((out / "shards").glob("*.*"))
        outputs[kind] = {p.name: p.read_bytes() for p in shards if p.suffix != ".json"}
    assert len(outputs["fixed"]) == 4 and outputs["fixed"] == outputs["batched"]


@pytest.mark.gpu
def test_batched_detection_on_cuda_matches_the_cpu(packs, images):
    """The CUDA path (uint8 batch from page-locked memory, normalised on the GPU, IO binding)."""
    from fgid.backends.full.device import onnx_providers

    config = config_for(packs["batched"])
    gpu = InsightFaceDetector(model_dir(config, ()), onnx_providers("cuda"), config)
    if gpu.cuda_device is None:
        pytest.skip("this ONNX Runtime has no CUDA provider (onnxruntime-gpu)")
    cpu = detector(packs["batched"])
    gpu.prepare_batch(images)
    for on_gpu, image in zip(gpu.detect(images), images, strict=True):
        boxes, kpss = per_image(cpu, image)
        assert len(on_gpu) == len(boxes)
        for face, box, kps in zip(on_gpu, boxes, kpss, strict=True):
            np.testing.assert_allclose(face.box, box[:4], atol=1e-2)
            np.testing.assert_allclose(face.landmarks, kps, atol=1e-2)
