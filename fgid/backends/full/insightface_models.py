"""InsightFace buffalo_l backends: SCRFD detector, ArcFace embedder, genderage estimator.

Uses InsightFace's own model classes (model_zoo routing, SCRFD decoding, norm_crop alignment,
ArcFace blob preprocessing) so results match `FaceAnalysis("buffalo_l")`. InsightFace works on
BGR images (its blobs swap channels back to RGB); the protocols pass RGB, so each backend
converts once at the boundary. An SCRFD export with a free batch axis runs a whole batch in one
session call, letterboxed and decoded exactly as InsightFace's per-image `SCRFD.detect` does.

`models.runtime` picks what runs the networks: onnxruntime, or torch (each ONNX file converted
at load by `torch_onnx`; the default on CUDA). InsightFace's model objects load either way: their
settings (normalisation, strides, anchors, thresholds, NMS) are the reference the torch path
follows, and on the torch path they run nothing.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections import deque
from pathlib import Path

import numpy as np

from fgid.backends.full.device import (
    CPU_PROVIDER,
    insightface_runtime,
    onnx_cuda_device,
    pinned_zeros,
    run_normalised,
    torch_device,
)
from fgid.config import BuildConfig
from fgid.protocols import Attributes, Detection

logger = logging.getLogger(__name__)

# Batches letterboxed ahead by `prepare_batch` and not yet detected; older ones are dropped.
PREPARED_MAX = 8

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


class Runtime:
    """Which runtime runs a model of the pack, and its torch network when that is torch."""

    def __init__(self, path: Path, providers: list, config: BuildConfig):
        models = config.models
        device = torch_device(models.device)
        self.name = insightface_runtime(models.runtime, device)
        self.providers = providers if self.name == "onnxruntime" else [CPU_PROVIDER]
        self.net = None
        if self.name == "torch":
            from fgid.backends.full.torch_onnx import TorchOnnx, torch_dtype

            dtype = torch_dtype(models.torch_precision, device)
            self.net = TorchOnnx(path, device, dtype, models.torch_compile)

    @property
    def cuda(self) -> bool:
        return self.net is not None and self.net.device.type == "cuda"


def _bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, :, ::-1])


def _batchable(model) -> bool:
    """True when the ONNX input has a free batch axis (a fixed 1 means one crop per run)."""
    batch = model.input_shape[0]
    return not isinstance(batch, int) or batch != 1


def letterbox(image: np.ndarray, size: tuple[int, int], out: np.ndarray) -> float:
    """Fit `image` into a (width, height) canvas keeping its aspect ratio, top-left in the
    zeroed `out`; return the scale. The rounding is SCRFD.detect's, so boxes match it."""
    import cv2

    width, height = size
    ratio = float(image.shape[0]) / image.shape[1]
    if ratio > float(height) / width:
        new_h = height
        new_w = int(new_h / ratio)
    else:
        new_w = width
        new_h = int(new_w * ratio)
    out[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return float(new_h) / image.shape[0]


def scrfd_batchable(model) -> bool:
    """A free input batch axis and batch-first (N, anchors, C) outputs: InsightFace's `batched`
    SCRFD layout. The buffalo_l release has a fixed batch of 1 and (anchors, C) outputs."""
    return _batchable(model) and bool(getattr(model, "batched", False))


class InsightFaceDetector:
    """SCRFD-10GF: all faces with 5 keypoints per image.

    A model with a free batch axis runs each batch as one session call (canvases letterboxed
    on the CPU, normalised on the session's device); a model fixed at batch 1 goes through
    InsightFace's own per-image `detect`."""

    def __init__(self, pack: Path, providers: list, config: BuildConfig):
        self.runtime = Runtime(pack / DETECTOR_FILE, providers, config)
        self.net = self.runtime.net
        self.model = load_model(pack / DETECTOR_FILE, self.runtime.providers, "SCRFD")
        if not self.model.use_kps:
            # The embedder aligns on these keypoints; a box-only SCRFD cannot feed it.
            raise RuntimeError(f"{pack / DETECTOR_FILE} is an SCRFD without keypoints")
        self.det_size = tuple(config.detect.det_size)
        # Candidates below min_score are dropped inside SCRFD, before NMS, as FaceAnalysis does.
        self.model.prepare(0, input_size=self.det_size, det_thresh=config.detect.min_score)
        self.name = f"insightface:{config.models.insightface_name}/{DETECTOR_FILE}"
        # A model with a fixed input size ignores det_size, in SCRFD.detect as here.
        height, width = self.model.input_shape[2:4]
        fixed = isinstance(height, int) and isinstance(width, int)
        self.canvas = (width, height) if fixed else self.det_size
        self.cuda_device = None if self.net else onnx_cuda_device(self.model.session)
        self._pinned = self.cuda_device is not None or self.runtime.cuda
        self._centres: dict[tuple[int, int, int], np.ndarray] = {}
        self._prepared: deque = deque(maxlen=PREPARED_MAX)
        self._lock = threading.Lock()
        # A torch network is not bound by the ONNX header's batch axis (a batch-1 export's
        # outputs split per image); the probe alone decides.
        free = self.net is not None or scrfd_batchable(self.model)
        self.batched = free and self._batch_matches_single()
        logger.info(
            "SCRFD %s on %s: %s",
            pack / DETECTOR_FILE,
            self.runtime.name,
            "batched" if self.batched else "one image a call",
        )

    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        if not self.batched:
            if self.net is not None:
                return [self._detect_batch([image])[0] for image in images]
            return [self._detect_one(image) for image in images]
        if not images:
            return []
        return self._detect_batch(images)

    def _detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        batch, pinned, scales = self._take_prepared(images) or self._letterbox(images)
        outputs = self._run(batch, pinned)
        if self.net is None:
            found = self._candidates(outputs, len(images))
        else:
            found = self._candidates_on_device(outputs, len(images))
        return [self._decode(levels, scale) for levels, scale in zip(found, scales, strict=True)]

    def prepare_batch(self, images: list[np.ndarray]) -> None:
        """Letterbox `images` now (a loader thread calls this ahead of the model stages) for the
        `detect` call that receives these same image objects. Never raises: an image it cannot
        prepare is left to `detect`, where its failure becomes that sample's rejection."""
        if not self.batched or not images:
            return
        try:
            prepared = self._letterbox(images)
        except Exception:  # noqa: BLE001 - detect() meets the same error and reports it
            logger.debug("could not letterbox a batch ahead; detect will", exc_info=True)
            return
        with self._lock:
            self._prepared.append((list(images), prepared))

    def _detect_one(self, image: np.ndarray) -> list[Detection]:
        boxes, kpss = self.model.detect(_bgr(image), input_size=self.det_size)
        return _detections(boxes, kpss)

    def _take_prepared(self, images: list[np.ndarray]):
        with self._lock:
            for entry in self._prepared:
                held, prepared = entry
                if len(held) == len(images) and all(map(operator.is_, held, images)):
                    self._prepared.remove(entry)
                    return prepared
        return None

    def _letterbox(self, images: list[np.ndarray]):
        width, height = self.canvas
        batch, pinned = pinned_zeros((len(images), height, width, 3), self._pinned)
        # RGB in, RGB canvas: InsightFace letterboxes BGR and swaps to RGB in its blob, and the
        # resize treats channels alike, so the canvas is the same.
        scales = [letterbox(image, self.canvas, batch[i]) for i, image in enumerate(images)]
        return batch, pinned, scales

    def _run(self, batch: np.ndarray, pinned: object) -> list:
        """The network's outputs for a letterboxed batch, batch-first (N, anchors, C): host
        arrays from onnxruntime, device tensors from torch."""
        m = self.model
        if self.net is None:
            cuda = self.cuda_device
            return run_normalised(m.session, batch, pinned, m.input_mean, m.input_std, cuda)
        host = pinned if pinned is not None else batch
        outputs = self.net(self.net.blob(host, m.input_mean, m.input_std))
        n = batch.shape[0]
        # A batch-1 export gives (N * anchors, C); its rows run image by image.
        return [o.reshape(n, -1, o.shape[-1]) for o in outputs]

    def _host(self, outputs: list) -> list[np.ndarray]:
        return [o if isinstance(o, np.ndarray) else o.cpu().numpy() for o in outputs]

    def _candidates(self, outputs: list[np.ndarray], n: int) -> list[list[tuple]]:
        """Per image, per stride: (anchor indices, scores, box and keypoint distances) of the
        anchors at or above the threshold, as SCRFD.forward selects them."""
        m, levels = self.model, len(self.model._feat_stride_fpn)
        found = []
        for i in range(n):
            per_level = []
            for level in range(levels):
                score = outputs[level][i]
                keep = np.where(score >= m.det_thresh)[0]
                box, kps = outputs[level + levels][i], outputs[level + 2 * levels][i]
                per_level.append((keep, score[keep], box[keep], kps[keep]))
            found.append(per_level)
        return found

    def _candidates_on_device(self, outputs: list, n: int) -> list[list[tuple]]:
        """`_candidates` for device tensors: the threshold and the gather run on the device, so
        only the candidates cross to the host (not every anchor's box and keypoints)."""
        m, levels = self.model, len(self.model._feat_stride_fpn)
        picked = []
        for level in range(levels):
            score = outputs[level]
            image, anchor = (score[..., 0] >= m.det_thresh).nonzero(as_tuple=True)
            box, kps = outputs[level + levels], outputs[level + 2 * levels]
            rows = (image, anchor, score[image, anchor], box[image, anchor], kps[image, anchor])
            picked.append([t.cpu().numpy() for t in rows])
        found = []
        for i in range(n):
            per_level = []
            for image, anchor, score, box, kps in picked:
                mine = image == i
                per_level.append((anchor[mine], score[mine], box[mine], kps[mine]))
            found.append(per_level)
        return found

    def _batch_matches_single(self) -> bool:
        """Whether the batch axis really is free: image 1 of a two-image batch must come out as
        it does alone (some exports declare a free axis over a graph built for one image)."""
        width, height = self.canvas
        pair = np.zeros((2, height, width, 3), np.uint8)
        pair[0] = np.random.default_rng(0).integers(0, 256, pair.shape[1:], dtype=np.uint8)
        pair[1] = 96  # a flat image: it must not pick up its neighbour's response
        try:
            together = self._host(self._run(pair, None))
            alone = self._host(self._run(pair[1:], None))
        except Exception as error:  # noqa: BLE001 - any failure means: run one image a call
            logger.warning("SCRFD batch probe failed (%s); detecting one image a call", error)
            return False
        # float16 rounds scores near 1 to steps of 5e-4, and kernels may differ by batch size.
        atol = 1e-2 if self.net is not None and self.net.dtype.itemsize == 2 else 1e-3
        same = all(
            t.shape[0] == 2 and np.allclose(t[1], a[0], rtol=1e-2, atol=atol)
            for t, a in zip(together, alone, strict=True)
        )
        if not same:
            logger.warning("SCRFD outputs mix the images of a batch; detecting one image a call")
        return same

    def _anchor_centres(self, rows: int, cols: int, stride: int) -> np.ndarray:
        key = (rows, cols, stride)
        if key not in self._centres:
            ys, xs = np.mgrid[:rows, :cols]
            centres = np.stack([xs, ys], axis=-1).astype(np.float32).reshape(-1, 2) * stride
            # Anchors of one location are consecutive in SCRFD's outputs.
            self._centres[key] = np.repeat(centres, self.model._num_anchors, axis=0)
        return self._centres[key]

    def _decode(self, levels: list[tuple], scale: float) -> list[Detection]:
        """One image's candidates (see `_candidates`) -> its faces, as SCRFD.detect computes
        them: anchor centres per stride, distance2bbox/kps, sort by score, NMS."""
        from insightface.model_zoo.scrfd import distance2bbox, distance2kps

        m = self.model
        width, height = self.canvas
        scores, boxes, points = [], [], []
        for (keep, score, box, kps), stride in zip(levels, m._feat_stride_fpn, strict=True):
            centres = self._anchor_centres(height // stride, width // stride, stride)[keep]
            box = box * stride
            kps = kps * stride
            scores.append(score)
            boxes.append(distance2bbox(centres, box))
            points.append(distance2kps(centres, kps).reshape(len(keep), kps.shape[1] // 2, 2))
        score = np.vstack(scores)
        if score.size == 0:
            return []
        order = np.argsort(-score.ravel(), kind="stable")
        dets = np.hstack((np.vstack(boxes) / scale, score)).astype(np.float32, copy=False)[order]
        kpss = (np.vstack(points) / scale)[order]
        keep = m.nms(dets)
        return _detections(dets[keep], kpss[keep])


def _detections(boxes: np.ndarray, kpss: np.ndarray) -> list[Detection]:
    return [
        Detection(
            box=boxes[i, :4].astype(np.float32),
            score=float(boxes[i, 4]),
            landmarks=kpss[i].astype(np.float32),
        )
        for i in range(boxes.shape[0])
    ]


class InsightFaceEmbedder:
    """ArcFace R50 (WebFace600K) on the 112x112 norm_crop; returns `normed_embedding`."""

    def __init__(self, pack: Path, providers: list, config: BuildConfig):
        self.runtime = Runtime(pack / RECOGNIZER_FILE, providers, config)
        self.net = self.runtime.net
        self.model = load_model(pack / RECOGNIZER_FILE, self.runtime.providers, "ArcFaceONNX")
        out_dim = self.model.output_shape[-1]
        self.dim = out_dim if isinstance(out_dim, int) else 512
        self.name = f"insightface:{config.models.insightface_name}/{RECOGNIZER_FILE}"

    def embed(self, images: list[np.ndarray], faces: list[Detection]) -> np.ndarray:
        from insightface.utils import face_align

        if not images:
            return np.zeros((0, self.dim), np.float32)
        size = self.model.input_size[0]
        if self.net is not None:
            # RGB crops straight to the network: the warp treats channels alike, so this is
            # the crop InsightFace makes from BGR, with its channel swap already done.
            crops = [
                face_align.norm_crop(img, landmark=face.landmarks, image_size=size)
                for img, face in zip(images, faces, strict=True)
            ]
            feats = _run_torch(self.net, self.model, crops)
            return _unit(feats.reshape(len(crops), -1))
        crops = [
            face_align.norm_crop(_bgr(img), landmark=face.landmarks, image_size=size)
            for img, face in zip(images, faces, strict=True)
        ]
        if _batchable(self.model):
            feats = self.model.get_feat(crops)
        else:
            feats = np.concatenate([self.model.get_feat(c) for c in crops])
        return _unit(feats.reshape(len(crops), -1))


def _unit(feats: np.ndarray) -> np.ndarray:
    feats = feats.astype(np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    # A zero vector stays zero rather than becoming NaN.
    return feats / np.maximum(norms, 1e-12)


def _run_torch(net, model, crops: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 crops through a torch network with the InsightFace model's normalisation; a
    whole batch a call when the ONNX input's batch axis is free, else one crop a call."""
    batch = np.stack(crops)
    chunks = [batch] if _batchable(model) else [batch[i : i + 1] for i in range(len(batch))]
    return np.concatenate([net.run(c, model.input_mean, model.input_std)[0] for c in chunks])


class InsightFaceAttributes:
    """genderage.onnx: gender (0 female, 1 male) and age, batched over faces."""

    def __init__(self, pack: Path, providers: list, config: BuildConfig):
        self.runtime = Runtime(pack / GENDERAGE_FILE, providers, config)
        self.net = self.runtime.net
        self.model = load_model(pack / GENDERAGE_FILE, self.runtime.providers, "Attribute")
        if self.model.taskname != "genderage":
            raise RuntimeError(f"{pack / GENDERAGE_FILE} is not a genderage model")
        self.name = f"insightface:{config.models.insightface_name}/{GENDERAGE_FILE}"

    def _crop(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """BGR for onnxruntime (InsightFace's blob swaps it back), RGB for torch."""
        from insightface.utils import face_align

        # Same framing as insightface's Attribute.get: box centre, longest side x 1.5.
        side = self.model.input_size[0]
        x1, y1, x2, y2 = (float(v) for v in box)
        scale = side / (max(x2 - x1, y2 - y1) * 1.5)
        center = ((x1 + x2) / 2, (y1 + y2) / 2)
        source = image if self.net is not None else _bgr(image)
        crop, _ = face_align.transform(source, center, side, scale, 0)
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
        if self.net is not None:
            preds = _run_torch(self.net, self.model, crops)
        elif _batchable(self.model):
            preds = self._run(crops)
        else:
            preds = np.concatenate([self._run([c]) for c in crops])
        out = []
        for pred in preds:
            gender = "male" if int(np.argmax(pred[:2])) == 1 else "female"
            # InsightFace reports age as round(100 * output); keep that convention.
            out.append(Attributes(age=float(np.round(pred[2] * 100)), gender=gender))
        return out
