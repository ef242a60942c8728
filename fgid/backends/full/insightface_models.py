"""InsightFace buffalo_l backends: SCRFD detector, ArcFace embedder, genderage estimator.

Uses InsightFace's own model classes (model_zoo routing, SCRFD decoding, norm_crop alignment,
ArcFace blob preprocessing) so results match `FaceAnalysis("buffalo_l")`. InsightFace works on
BGR images (its blobs swap channels back to RGB); the protocols pass RGB, so each backend
converts once at the boundary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fgid.config import BuildConfig
from fgid.protocols import Attributes, Detection

logger = logging.getLogger(__name__)

DETECTOR_FILE = "det_10g.onnx"
RECOGNIZER_FILE = "w600k_r50.onnx"
GENDERAGE_FILE = "genderage.onnx"
DEFAULT_ROOT = "~/.insightface"


def model_dir(config: BuildConfig, required: tuple[str, ...]) -> Path:
    """The pack directory `<root>/models/<name>`, downloaded only for the default root.

    An explicit root is the user saying "the weights are here": a missing file there is an error,
    never a silent download somewhere else."""
    name = config.models.insightface_name
    if config.models.insightface_root is None:
        from insightface.utils import ensure_available

        # InsightFace's own behaviour: download the pack zip into ~/.insightface when absent.
        try:
            pack = Path(ensure_available("models", name, root=DEFAULT_ROOT))
        except Exception as error:  # any download failure means the same thing to the user
            raise RuntimeError(
                f"InsightFace pack {name!r} is not in {DEFAULT_ROOT}/models and could not be "
                f"downloaded ({error}); set models.insightface_root to a local copy"
            ) from error
    else:
        pack = Path(config.models.insightface_root).expanduser() / "models" / name
    missing = [f for f in required if not (pack / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"InsightFace pack {pack} lacks {', '.join(missing)}; set models.insightface_root "
            f"to a dir holding models/{name}/ with {', '.join(required)}"
        )
    return pack


def load_model(path: Path, providers: list, expected: str):
    """Load one ONNX file through InsightFace's router and check it landed on `expected`."""
    from insightface.model_zoo import get_model

    model = get_model(str(path), providers=providers)
    if type(model).__name__ != expected:
        raise RuntimeError(f"{path} was routed to {type(model).__name__}, expected {expected}")
    logger.info("loaded %s as %s on %s", path.name, expected, model.session.get_providers())
    return model


def _bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, :, ::-1])


def _batchable(model) -> bool:
    """True when the ONNX input has a free batch axis (a fixed 1 means one crop per run)."""
    batch = model.input_shape[0]
    return not isinstance(batch, int) or batch != 1


class InsightFaceDetector:
    """SCRFD-10GF: all faces with 5 keypoints, per image (SCRFD runs one image at a time)."""

    def __init__(self, pack: Path, providers: list, config: BuildConfig):
        self.model = load_model(pack / DETECTOR_FILE, providers, "SCRFD")
        if not self.model.use_kps:
            # The embedder aligns on these keypoints; a box-only SCRFD cannot feed it.
            raise RuntimeError(f"{pack / DETECTOR_FILE} is an SCRFD without keypoints")
        self.det_size = tuple(config.detect.det_size)
        # Candidates below min_score are dropped inside SCRFD, before NMS, as FaceAnalysis does.
        self.model.prepare(0, input_size=self.det_size, det_thresh=config.detect.min_score)
        self.name = f"insightface:{config.models.insightface_name}/{DETECTOR_FILE}"

    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        results = []
        for image in images:
            boxes, kpss = self.model.detect(_bgr(image), input_size=self.det_size)
            results.append(
                [
                    Detection(
                        box=boxes[i, :4].astype(np.float32),
                        score=float(boxes[i, 4]),
                        landmarks=kpss[i].astype(np.float32),
                    )
                    for i in range(boxes.shape[0])
                ]
            )
        return results


class InsightFaceEmbedder:
    """ArcFace R50 (WebFace600K) on the 112x112 norm_crop; returns `normed_embedding`."""

    def __init__(self, pack: Path, providers: list, config: BuildConfig):
        self.model = load_model(pack / RECOGNIZER_FILE, providers, "ArcFaceONNX")
        out_dim = self.model.output_shape[-1]
        self.dim = out_dim if isinstance(out_dim, int) else 512
        self.name = f"insightface:{config.models.insightface_name}/{RECOGNIZER_FILE}"

    def embed(self, images: list[np.ndarray], faces: list[Detection]) -> np.ndarray:
        from insightface.utils import face_align

        if not images:
            return np.zeros((0, self.dim), np.float32)
        size = self.model.input_size[0]
        crops = [
            face_align.norm_crop(_bgr(img), landmark=face.landmarks, image_size=size)
            for img, face in zip(images, faces, strict=True)
        ]
        if _batchable(self.model):
            feats = self.model.get_feat(crops)
        else:
            feats = np.concatenate([self.model.get_feat(c) for c in crops])
        feats = feats.reshape(len(crops), -1).astype(np.float32)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        # A zero vector stays zero rather than becoming NaN.
        return feats / np.maximum(norms, 1e-12)


class InsightFaceAttributes:
    """genderage.onnx: gender (0 female, 1 male) and age, batched over faces."""

    def __init__(self, pack: Path, providers: list, config: BuildConfig):
        self.model = load_model(pack / GENDERAGE_FILE, providers, "Attribute")
        if self.model.taskname != "genderage":
            raise RuntimeError(f"{pack / GENDERAGE_FILE} is not a genderage model")
        self.name = f"insightface:{config.models.insightface_name}/{GENDERAGE_FILE}"

    def _crop(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        from insightface.utils import face_align

        # Same framing as insightface's Attribute.get: box centre, longest side x 1.5.
        side = self.model.input_size[0]
        x1, y1, x2, y2 = (float(v) for v in box)
        scale = side / (max(x2 - x1, y2 - y1) * 1.5)
        center = ((x1 + x2) / 2, (y1 + y2) / 2)
        crop, _ = face_align.transform(_bgr(image), center, side, scale, 0)
        return crop

    def _run(self, crops: list[np.ndarray]) -> np.ndarray:
        import cv2

        m = self.model
        blob = cv2.dnn.blobFromImages(
            crops, 1.0 / m.input_std, m.input_size, (m.input_mean,) * 3, swapRB=True
        )
        return m.session.run(m.output_names, {m.input_name: blob.astype(np.float32)})[0]

    def estimate(self, images: list[np.ndarray], faces: list[Detection]) -> list[Attributes]:
        if not images:
            return []
        crops = [self._crop(img, f.box) for img, f in zip(images, faces, strict=True)]
        if _batchable(self.model):
            preds = self._run(crops)
        else:
            preds = np.concatenate([self._run([c]) for c in crops])
        out = []
        for pred in preds:
            gender = "male" if int(np.argmax(pred[:2])) == 1 else "female"
            # InsightFace reports age as round(100 * output); keep that convention.
            out.append(Attributes(age=float(np.round(pred[2] * 100)), gender=gender))
        return out
