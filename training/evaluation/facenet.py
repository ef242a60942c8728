"""FaceNet for the paper's FaceSim: Inception-ResNet-v1 trained on VGGFace2 (Schroff et al. 2015).

The state-dict names are facenet-pytorch's `InceptionResnetV1`, so its released VGGFace2 file
(`20180402-114759-vggface2.pt`, with or without the `logits.*` classifier) loads unchanged;
facenet-pytorch itself pins torch < 2.3 and is not a dependency. Input: the face's detection box
cropped and resized to 160x160 (what facenet-pytorch's MTCNN hands it, margin 0), standardised
as (x - 127.5) / 128; output: a 512-d L2-normalised embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FACENET_SIZE = 160
VGGFACE2_FILE = "20180402-114759-vggface2.pt"


class BasicConv2d(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.1)  # TensorFlow's epsilon
        self.relu = nn.ReLU()


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    """Inception-ResNet block: concatenated branches, a 1x1 conv back to the input width,
    scaled and added to the input."""

    def __init__(self, scale: float, relu: bool):
        super().__init__()
        self.scale, self.use_relu = scale, relu
        if relu:
            self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch0(x), self.branch1(x)]
        if hasattr(self, "branch2"):
            branches.append(self.branch2(x))
        out = self.conv2d(torch.cat(branches, 1)) * self.scale + x
        return self.relu(out) if self.use_relu else out


class Block35(_Residual):
    def __init__(self, scale: float = 1.0):
        super().__init__(scale, True)
        self.branch0 = BasicConv2d(256, 32, 1)
        self.branch1 = _seq(BasicConv2d(256, 32, 1), BasicConv2d(32, 32, 3, padding=1))
        self.branch2 = _seq(
            BasicConv2d(256, 32, 1),
            BasicConv2d(32, 32, 3, padding=1),
            BasicConv2d(32, 32, 3, padding=1),
        )
        self.conv2d = nn.Conv2d(96, 256, 1)


class Block17(_Residual):
    def __init__(self, scale: float = 1.0):
        super().__init__(scale, True)
        self.branch0 = BasicConv2d(896, 128, 1)
        self.branch1 = _seq(
            BasicConv2d(896, 128, 1),
            BasicConv2d(128, 128, (1, 7), padding=(0, 3)),
            BasicConv2d(128, 128, (7, 1), padding=(3, 0)),
        )
        self.conv2d = nn.Conv2d(256, 896, 1)


class Block8(_Residual):
    def __init__(self, scale: float = 1.0, relu: bool = True):
        super().__init__(scale, relu)
        self.branch0 = BasicConv2d(1792, 192, 1)
        self.branch1 = _seq(
            BasicConv2d(1792, 192, 1),
            BasicConv2d(192, 192, (1, 3), padding=(0, 1)),
            BasicConv2d(192, 192, (3, 1), padding=(1, 0)),
        )
        self.conv2d = nn.Conv2d(384, 1792, 1)


class _Mixed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = sorted(n for n in dir(self) if n.startswith("branch") and n[6:].isdigit())
        return torch.cat([getattr(self, n)(x) for n in names], 1)


class Mixed6a(_Mixed):
    def __init__(self):
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, 3, stride=2)
        self.branch1 = _seq(
            BasicConv2d(256, 192, 1),
            BasicConv2d(192, 192, 3, padding=1),
            BasicConv2d(192, 256, 3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)


class Mixed7a(_Mixed):
    def __init__(self):
        super().__init__()
        self.branch0 = _seq(BasicConv2d(896, 256, 1), BasicConv2d(256, 384, 3, stride=2))
        self.branch1 = _seq(BasicConv2d(896, 256, 1), BasicConv2d(256, 256, 3, stride=2))
        self.branch2 = _seq(
            BasicConv2d(896, 256, 1),
            BasicConv2d(256, 256, 3, padding=1),
            BasicConv2d(256, 256, 3, stride=2),
        )
        self.branch3 = nn.MaxPool2d(3, stride=2)


class InceptionResnetV1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, 3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, 3)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3)
        self.conv2d_4b = BasicConv2d(192, 256, 3, stride=2)
        self.repeat_1 = _seq(*(Block35(0.17) for _ in range(5)))
        self.mixed_6a = Mixed6a()
        self.repeat_2 = _seq(*(Block17(0.10) for _ in range(10)))
        self.mixed_7a = Mixed7a()
        self.repeat_3 = _seq(*(Block8(0.20) for _ in range(5)))
        self.block8 = Block8(relu=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=0.001, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 160, 160) standardised faces -> (B, 512) L2-normalised embeddings."""
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b",
                     "conv2d_4a", "conv2d_4b", "repeat_1", "mixed_6a", "repeat_2", "mixed_7a",
                     "repeat_3", "block8", "avgpool_1a"):  # fmt: skip
            x = getattr(self, name)(x)
        x = self.last_bn(self.last_linear(x.flatten(1)))
        return F.normalize(x, p=2, dim=1)


def load_facenet(path: str | Path | None) -> InceptionResnetV1:
    """The VGGFace2 weights from `path` (its classifier `logits.*` is dropped); None = random
    weights, for tests only."""
    model = InceptionResnetV1()
    if path is not None:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def crop_box(image: np.ndarray, box: Sequence[float], size: int = FACENET_SIZE) -> torch.Tensor:
    """The detection box (x1, y1, x2, y2), clipped to the image, resized to size x size and
    standardised: (3, size, size)."""
    h, w = image.shape[:2]
    x1, y1 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    x2, y2 = min(w, int(round(box[2]))), min(h, int(round(box[3])))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty face box {tuple(box)}")
    crop = torch.from_numpy(np.ascontiguousarray(image[y1:y2, x1:x2])).permute(2, 0, 1).float()
    crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return (crop - 127.5) / 128.0


class FaceNetScorer:
    """Batch-in embeddings of face boxes; the model is loaded once."""

    def __init__(self, model: InceptionResnetV1, device: str = "cpu", batch_size: int = 32):
        self.model = model.to(device)
        self.device, self.batch_size = device, batch_size
        self.name = "facenet-inception-resnet-v1-vggface2"

    @torch.inference_mode()
    def embeddings(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[float]]):
        crops = [crop_box(image, box) for image, box in zip(images, boxes, strict=True)]
        out = []
        for start in range(0, len(crops), self.batch_size):
            batch = torch.stack(crops[start : start + self.batch_size]).to(self.device)
            out.append(self.model(batch).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 512), dtype=np.float32)
