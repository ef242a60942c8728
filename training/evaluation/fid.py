"""FID: features from a network behind a small protocol, and pytorch-fid's Frechet distance.

Users get pytorch-fid's InceptionV3 (pool3, 2048-d), the network FID numbers are reported with.
Its weights come through torch hub's cache: offline machines place
`pt_inception-2015-12-05-6726825d.pth` in `$TORCH_HOME/hub/checkpoints/`. Any other network that
implements `FeatureNetwork` (DINO's CLS features, a tiny test network) plugs in the same way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from training.evaluation.backbones import DinoScorer, as_pil, resolve_device

log = logging.getLogger(__name__)


@runtime_checkable
class FeatureNetwork(Protocol):
    name: str

    def features(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """Images -> (N, D) float64 features whose distribution FID compares."""
        ...


class InceptionFeatures:
    """pytorch-fid's InceptionV3 pool3 features (2048-d), inputs resized to 299x299."""

    name = "pytorch-fid-inception-v3-pool3"
    size = 299

    def __init__(self, device: str = "auto", batch_size: int = 32) -> None:
        from pytorch_fid.inception import InceptionV3

        self.device = resolve_device(device)
        block = InceptionV3.BLOCK_INDEX_BY_DIM[2048]
        self.model = InceptionV3([block]).to(self.device).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        out = []
        images = list(images)
        for start in range(0, len(images), self.batch_size):
            # Resize on the host so one batch holds images of any size; the network expects
            # [0, 1] and rescales to [-1, 1] itself.
            batch = np.stack(
                [
                    np.asarray(as_pil(i).resize((self.size, self.size), Image.Resampling.BILINEAR))
                    for i in images[start : start + self.batch_size]
                ]
            )
            pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255)
            pool = self.model(pixels.to(self.device))[0]
            out.append(pool.flatten(1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


class DinoFeatures:
    """DINO CLS features as an FID feature space (as in FD-DINO scores)."""

    def __init__(self, scorer: DinoScorer) -> None:
        self.scorer = scorer
        self.name = f"dino-cls:{scorer.name}"

    def features(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        return self.scorer.cls_features(images).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (rows = images); NaN with fewer than two rows in either.

    With fewer images than feature dimensions the covariances are singular; pytorch-fid then
    adds a small diagonal offset, which keeps the value finite but makes small-set FIDs
    comparable only with FIDs over the same number of images."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy.linalg import LinAlgWarning

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    stdout = io.StringIO()
    # pytorch-fid reports the singular-covariance fallback with print(); keep it in the log.
    # Singular covariances are expected here (see above), and the argument scipy deprecates is
    # pytorch-fid's to change: neither warning tells the user anything.
    with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `disp` argument", DeprecationWarning)
        warnings.filterwarnings("ignore", "Matrix is singular", LinAlgWarning)
        # sqrtm's error estimate divides by the product's norm, 0 when a set's images give
        # equal features; pytorch-fid ignores that estimate, and the distance stays finite.
        warnings.filterwarnings(
            "ignore", "invalid value encountered in scalar divide", RuntimeWarning, "scipy"
        )
        value = calculate_frechet_distance(
            a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        )
    if stdout.getvalue().strip():
        log.debug("pytorch-fid: %s", stdout.getvalue().strip())
    return float(value)
