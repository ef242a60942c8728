"""The InsightFace models run in torch (converted from ONNX) give onnxruntime's and InsightFace's
own results: faces, landmarks, embeddings, age and gender, on tiny models saved under real names.

Tolerances, float32 on the CPU: boxes and landmarks within 1e-3 source pixels, scores within
1e-6, embeddings within 1e-5 per component, age and gender equal. float16: boxes and landmarks
within 0.5 pixels, scores within 2e-3, embeddings at cosine similarity >= 0.999, gender equal,
age within 1 year.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from fgid.backends.full.device import insightface_runtime
from fgid.backends.full.insightface_models import (
    DETECTOR_FILE,
    InsightFaceAttributes,
    InsightFaceDetector,
    InsightFaceEmbedder,
    model_dir,
)
from fgid.config import BuildConfig
from tests.tiny_full_models import build_insightface_pack

CPU = ["CPUExecutionProvider"]
FP32 = {"box": 1e-3, "score": 1e-6}
FP16 = {"box": 0.5, "score": 2e-3}


def config_for(root: Path, device: str = "cpu", **models: object) -> BuildConfig:
    settings = {"set": "full", "insightface_root": str(root), "device": device, **models}
    return BuildConfig(models=settings, detect={"min_face_size": 8})


def loaded(cls, root: Path, runtime: str, device: str = "cpu", detect=None, **models):
    config = config_for(root, device, runtime=runtime, **models)
    if detect:
        config = config.model_copy(update={"detect": config.detect.model_copy(update=detect)})
    return cls(model_dir(config, ()), CPU, config)


def release_layout_pack(root: Path) -> Path:
    """A detector laid out as the buffalo_l release is: input batch fixed at 1, outputs
    (anchors, C) without a batch axis, each image computed on its own."""
    import onnx
    from onnx import numpy_helper

    pack = build_insightface_pack(root, batched_detector=True)
    path = pack / "models" / "buffalo_l" / DETECTOR_FILE
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name in ("shape_s", "shape_b", "shape_k"):
            width = int(numpy_helper.to_array(init)[-1])
            init.CopyFrom(numpy_helper.from_array(np.array([-1, width], np.int64), init.name))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    for output in model.graph.output:
        del output.type.tensor_type.shape.dim[0]
    onnx.save(model, str(path))
    return pack


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packs")
    return {
        "fixed": build_insightface_pack(root / "fixed"),
        "batched": build_insightface_pack(root / "batched", batched_detector=True),
        "release": release_layout_pack(root / "release"),
    }


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Photos of several sizes and shapes (each letterboxed differently) and a flat image."""
    import insightface

    astronaut = data.astronaut()
    group = cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"))
    return [
        astronaut,
        np.ascontiguousarray(group[:, :, ::-1]),
        np.ascontiguousarray(astronaut[:300, 150:250]),
        cv2.resize(astronaut, (900, 200)),
        cv2.resize(astronaut, (90, 70)),
        np.full((300, 300, 3), 128, np.uint8),
    ]


def insightface_detect(det: InsightFaceDetector, image: np.ndarray):
    """InsightFace's own SCRFD.detect on onnxruntime, on one image (it takes BGR)."""
    return det.model.detect(np.ascontiguousarray(image[:, :, ::-1]), input_size=det.det_size)


def assert_close_faces(faces, reference, tol: dict) -> None:
    boxes, kpss = reference
    assert len(faces) == boxes.shape[0]
    for face, box, kps in zip(faces, boxes, kpss, strict=True):
        np.testing.assert_allclose(face.box, box[:4], atol=tol["box"], rtol=0)
        assert face.score == pytest.approx(float(box[4]), abs=tol["score"])
        np.testing.assert_allclose(face.landmarks, kps, atol=tol["box"], rtol=0)


def test_auto_runtime_is_torch_on_cuda_and_onnxruntime_on_the_cpu():
    assert insightface_runtime("auto", "cuda") == "torch"
    assert insightface_runtime("auto", "cuda:1") == "torch"
    assert insightface_runtime("auto", "cpu") == "onnxruntime"
    assert insightface_runtime("torch", "cpu") == "torch"
    assert insightface_runtime("onnxruntime", "cuda") == "onnxruntime"


def test_runtime_defaults_stay_out_of_the_output_hash():
    base = BuildConfig()
    assert "runtime" not in base.model_dump(mode="json")["models"]
    defaults = {"runtime": "auto", "torch_precision": "auto", "torch_compile": "off"}
    same = base.with_overrides(**{f"models.{k}": v for k, v in defaults.items()})
    assert same.output_hash() == base.output_hash()
    for key, value in (
        ("models.runtime", "torch"),
        ("models.torch_precision", "float16"),
        ("models.torch_compile", "default"),
    ):
        assert base.with_overrides(**{key: value}).output_hash() != base.output_hash()


def test_the_default_on_the_cpu_is_onnxruntime(packs):
    det = loaded(InsightFaceDetector, packs["batched"], "auto")
    assert det.runtime.name == "onnxruntime" and det.net is None


@pytest.mark.parametrize("kind", ["fixed", "batched", "release"])
@pytest.mark.parametrize(
    "detect",
    [{}, {"min_score": 0.0, "det_size": (160, 160)}],
    ids=["default-threshold", "every-anchor"],
)
def test_torch_detection_equals_insightface_detect(packs, images, kind, detect):
    det = loaded(InsightFaceDetector, packs[kind], "torch", detect=detect)
    assert det.runtime.name == "torch" and det.net is not None
    # The fixed tiny export pools over the whole batch: only one image a call is right. The
    # release layout (batch 1, no batch axis) computes each image alone: torch batches it.
    assert det.batched == (kind != "fixed")
    reference = loaded(InsightFaceDetector, packs[kind], "onnxruntime", detect=detect)
    assert reference.net is None
    found = det.detect(images)
    assert [len(f) > 0 for f in found] == [True] * 5 + [detect != {}]
    for image, faces in zip(images, found, strict=True):
        assert_close_faces(faces, insightface_detect(reference, image), FP32)


def test_torch_detection_of_batches_prepared_ahead(packs, images):
    det = loaded(InsightFaceDetector, packs["release"], "torch")
    fresh = det.detect(images)
    det.prepare_batch(images)
    again = det.detect(list(images))
    for a, b in zip(fresh, again, strict=True):
        assert [(f.box.tolist(), f.score) for f in a] == [(f.box.tolist(), f.score) for f in b]


def faces_of(images: list[np.ndarray], root: Path) -> list:
    det = loaded(InsightFaceDetector, root, "onnxruntime")
    return [found[0] for found in det.detect(images[:5])]


def test_torch_embeddings_and_attributes_equal_onnxruntime(packs, images):
    faces = faces_of(images, packs["batched"])
    photos = images[:5]
    emb = {
        rt: loaded(InsightFaceEmbedder, packs["batched"], rt).embed(photos, faces)
        for rt in ("torch", "onnxruntime")
    }
    assert emb["torch"].shape == (5, 512) and emb["torch"].dtype == np.float32
    np.testing.assert_allclose(emb["torch"], emb["onnxruntime"], atol=1e-5, rtol=0)
    attrs = {
        rt: loaded(InsightFaceAttributes, packs["batched"], rt).estimate(photos, faces)
        for rt in ("torch", "onnxruntime")
    }
    assert attrs["torch"] == attrs["onnxruntime"]
    assert loaded(InsightFaceEmbedder, packs["batched"], "torch").embed([], []).shape == (0, 512)


def test_float16_stays_within_its_tolerances(packs, images):
    """Half precision (the CUDA default), run on the CPU where its kernels exist."""
    half = {"torch_precision": "float16"}
    det = loaded(InsightFaceDetector, packs["release"], "torch", **half)
    reference = loaded(InsightFaceDetector, packs["release"], "onnxruntime")
    for image, faces in zip(images, det.detect(images), strict=True):
        assert_close_faces(faces, insightface_detect(reference, image), FP16)
    faces, photos = faces_of(images, packs["batched"]), images[:5]
    a = loaded(InsightFaceEmbedder, packs["batched"], "torch", **half).embed(photos, faces)
    b = loaded(InsightFaceEmbedder, packs["batched"], "onnxruntime").embed(photos, faces)
    assert (a * b).sum(1).min() >= 0.999
    ga = loaded(InsightFaceAttributes, packs["batched"], "torch", **half).estimate(photos, faces)
    gb = loaded(InsightFaceAttributes, packs["batched"], "onnxruntime").estimate(photos, faces)
    assert [x.gender for x in ga] == [x.gender for x in gb]
    assert max(abs(x.age - y.age) for x, y in zip(ga, gb, strict=True)) <= 1.0


def test_shared_weights_of_torch_exports_convert(tmp_path):
    """torch's exporter writes equal weights once, read through Identity nodes."""
    import onnx
    import onnxruntime
    import torch

    from fgid.backends.full.torch_onnx import TorchOnnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        *(torch.nn.Conv2d(3, 3, 3, padding=1, bias=False), torch.nn.BatchNorm2d(3)) * 2
    ).eval()
    path = tmp_path / "shared.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            net, (torch.rand(1, 3, 8, 8),), str(path), dynamo=False, input_names=["x"],
            dynamic_axes={"x": {0: "n"}},
        )  # fmt: skip
    assert any(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node)
    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    blob = ((batch.transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 128).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=CPU)
    [want] = session.run(None, {"x": blob})
    [got] = TorchOnnx(path, "cpu", torch.float32).run(batch, 127.5, 128.0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_constant_reshapes_trace_under_torch_compile(packs):
    """The released SCRFD reshapes to stored shapes; onnx2torch's Reshape reads them as a
    tensor, which torch.compile's tracing rejects (compiled SCRFD fell back to one image a
    call on the GPU). After static_reshapes the graph traces, and computes the same."""
    import torch
    from onnx2torch import convert
    from onnx2torch.node_converters.reshape import OnnxReshape

    from fgid.backends.full.torch_onnx import load_graph, static_reshapes

    path = packs["release"] / "models" / "buffalo_l" / DETECTOR_FILE
    module = static_reshapes(convert(load_graph(path))).eval()
    assert not any(isinstance(m, OnnxReshape) for m in module.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        want = module(x)
        got = torch.compile(module, backend="eager")(x)  # dynamo's tracing, no code generation
        with pytest.raises(Exception, match="torch.Size"):  # onnx2torch's own, for contrast
            torch.compile(convert(load_graph(path)).eval(), backend="eager")(x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", ["off", "default", "reduce-overhead"])
def test_cuda_runtime_matches_the_cpu(packs, images, compile_mode):
    """The CUDA default (torch, float16, channels-last, page-locked batches), compiled or not."""
    settings = {"torch_compile": compile_mode}
    det = loaded(InsightFaceDetector, packs["release"], "auto", "cuda", **settings)
    assert det.runtime.name == "torch" and det.runtime.cuda and det.batched
    reference = loaded(InsightFaceDetector, packs["release"], "onnxruntime")
    det.prepare_batch(images)
    for _ in range(2):  # the second call replays what the first compiled or captured
        for image, faces in zip(images, det.detect(images), strict=True):
            assert_close_faces(faces, insightface_detect(reference, image), FP16)
    faces, photos = faces_of(images, packs["batched"]), images[:5]
    emb = loaded(InsightFaceEmbedder, packs["batched"], "auto", "cuda", **settings)
    want = loaded(InsightFaceEmbedder, packs["batched"], "onnxruntime").embed(photos, faces)
    for _ in range(2):
        assert (emb.embed(photos, faces) * want).sum(1).min() >= 0.999
    attrs = loaded(InsightFaceAttributes, packs["batched"], "auto", "cuda", **settings)
    ga = attrs.estimate(photos, faces)
    gb = loaded(InsightFaceAttributes, packs["batched"], "onnxruntime").estimate(photos, faces)
    assert [x.gender for x in ga] == [x.gender for x in gb]
    assert max(abs(x.age - y.age) for x, y in zip(ga, gb, strict=True)) <= 1.0


@pytest.mark.gpu
def test_cuda_float32_equals_onnxruntime_closely(packs, images):
    det = loaded(InsightFaceDetector, packs["batched"], "torch", "cuda", torch_precision="float32")
    reference = loaded(InsightFaceDetector, packs["batched"], "onnxruntime")
    tol = {"box": 1e-2, "score": 1e-5}  # GPU convolutions sum in another order
    for image, faces in zip(images, det.detect(images), strict=True):
        assert_close_faces(faces, insightface_detect(reference, image), tol)
