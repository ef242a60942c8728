"""Real-size stand-ins for the full model set, random weights, saved where the loaders look.

Speed depends on architecture and size, not on trained weights, so the GPU benchmark builds:
- an SCRFD-10GF-shaped detector: a ResNet-style basic-block backbone with SCRFD-10GF's stage
  widths and depths (56/88/88/224; 3/4/2/3 blocks; deep stem), a PAFPN neck (56 channels) and
  per-stride heads (3 stacked 80-channel convs); exported with free batch/height/width axes and
  InsightFace's 9 batch-first outputs (score, box, keypoints per stride 8/16/32, 2 anchors).
  Its scores carry a fixed prior so each image shows one face at the canvas centre, as a
  portrait dataset would: the decode, NMS, alignment and the later stages then see the work
  real photos give them. The trained network's exact layers are not public as code here.
- iresnet50 (InsightFace's ArcFace R50 layout) 112x112 -> 512, a genderage-shaped net
  96x96 -> 3, and facexlib's own BiSeNet (ResNet-18) saved as parsing_bisenet.pth.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

log = logging.getLogger(__name__)

# Score prior (logits): the centre anchor of stride 8 is a face, everything else is not.
FACE_LOGIT, BACKGROUND_LOGIT = 12.0, -12.0
# The planted face in stride-8 units (left, top, right, bottom) and its five keypoints.
FACE_BOX = (12.0, 16.0, 12.0, 16.0)
FACE_KPS = (-4.0, -4.0, 4.0, -4.0, 0.0, 2.0, -3.5, 7.0, 3.5, 7.0)
# Network outputs enter the planted values scaled down: every layer still runs and counts.
OUTPUT_GAIN = 1e-3


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, act=False))
        self.short = nn.Identity()
        if stride != 1 or cin != cout:  # ResNet-D shortcut: average pool, then 1x1
            pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
            self.short = nn.Sequential(pool, conv_bn(cin, cout, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class ScrfdShaped(nn.Module):
    """SCRFD-10GF-shaped detector with InsightFace's batched 9-output layout."""

    widths, depths, stem, neck, head, strides, anchors = (
        (56, 88, 88, 224),
        (3, 4, 2, 3),
        56,
        56,
        80,
        (8, 16, 32),
        2,
    )

    def __init__(self) -> None:
        super().__init__()
        s = self.stem
        self.stem_layers = nn.Sequential(
            conv_bn(3, s // 2, 3, 2),
            conv_bn(s // 2, s // 2),
            conv_bn(s // 2, s),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], s
        for i, (width, depth) in enumerate(zip(self.widths, self.depths, strict=True)):
            blocks = [
                BasicBlock(cin if j == 0 else width, width, 2 if i and not j else 1)
                for j in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        levels = self.widths[1:]  # strides 8, 16, 32
        n = self.neck
        self.lateral = nn.ModuleList(nn.Conv2d(c, n, 1) for c in levels)
        self.fpn = nn.ModuleList(nn.Conv2d(n, n, 3, padding=1) for _ in levels)
        self.down = nn.ModuleList(nn.Conv2d(n, n, 3, 2, 1) for _ in levels[1:])
        self.pafpn = nn.ModuleList(nn.Conv2d(n, n, 3, padding=1) for _ in levels[1:])
        h, a = self.head, self.anchors
        self.towers = nn.ModuleList(
            nn.Sequential(conv_bn(n, h), conv_bn(h, h), conv_bn(h, h)) for _ in levels
        )
        self.cls = nn.ModuleList(nn.Conv2d(h, a, 3, padding=1) for _ in levels)
        self.reg = nn.ModuleList(nn.Conv2d(h, 4 * a, 3, padding=1) for _ in levels)
        self.kps = nn.ModuleList(nn.Conv2d(h, 10 * a, 3, padding=1) for _ in levels)
        self.register_buffer("box", torch.tensor(FACE_BOX).repeat(a).view(1, 4 * a, 1, 1))
        self.register_buffer("points", torch.tensor(FACE_KPS).repeat(a).view(1, 10 * a, 1, 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem_layers(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        laterals = [conv(f) for conv, f in zip(self.lateral, outs[1:], strict=True)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            up = F.interpolate(laterals[i], laterals[i - 1].shape[2:])
            laterals[i - 1] = laterals[i - 1] + up
        inter = [conv(f) for conv, f in zip(self.fpn, laterals, strict=True)]
        for i, down in enumerate(self.down):  # bottom-up
            inter[i + 1] = inter[i + 1] + down(inter[i])
        return [inter[0]] + [conv(f) for conv, f in zip(self.pafpn, inter[1:], strict=True)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, boxes, points = [], [], []
        for level, feat in enumerate(self.features(x)):
            t = self.towers[level](feat)
            n, _, h, w = t.shape
            rows = torch.arange(h, device=x.device).view(h, 1)
            cols = torch.arange(w, device=x.device).view(1, w)
            centre = (rows == h // 2) & (cols == w // 2)
            face = FACE_LOGIT if level == 0 else BACKGROUND_LOGIT
            prior = torch.where(centre, face, BACKGROUND_LOGIT).to(t.dtype)
            prior = torch.stack([prior, torch.full_like(prior, BACKGROUND_LOGIT)])  # 2 anchors
            logit = self.cls[level](t) * OUTPUT_GAIN + prior
            box = self.reg[level](t) * OUTPUT_GAIN + self.box
            kps = self.kps[level](t) * OUTPUT_GAIN + self.points

            def flat(v: torch.Tensor, c: int, n: int = n) -> torch.Tensor:
                return v.permute(0, 2, 3, 1).reshape(n, -1, c)  # (y, x, anchor) order

            scores.append(flat(logit.sigmoid(), 1))
            boxes.append(flat(box, 4))
            points.append(flat(kps, 10))
        return (*scores, *boxes, *points)


class IBasicBlock(nn.Module):
    """ArcFace's pre-activation residual block (BN, conv, BN, PReLU, conv, BN)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.short(x)


class IResNet50(nn.Module):
    """iresnet50: 112x112 face -> 512-d embedding (layers 3/4/14/3, widths 64..512)."""

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)], 64
        for width, depth in zip((64, 128, 256, 512), (3, 4, 14, 3), strict=True):
            layers += [
                IBasicBlock(cin if j == 0 else width, width, 2 if j == 0 else 1)
                for j in range(depth)
            ]
            cin = width
        self.body = nn.Sequential(*layers, nn.BatchNorm2d(512))
        self.fc = nn.Linear(512 * 7 * 7, dim)
        self.features = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.body(x).flatten(1)))


class GenderAgeShaped(nn.Module):
    """A small depthwise-separable net, 96x96 -> (female, male, age / 100), like genderage."""

    def __init__(self) -> None:
        super().__init__()
        layers, cin = [conv_bn(3, 16, 3, 2)], 16
        for cout, stride in ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)):
            layers += [
                nn.Sequential(
                    nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                    nn.BatchNorm2d(cin),
                    nn.ReLU(inplace=True),
                ),
                conv_bn(cin, cout, 1),
            ]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of convolutions and linear layers for input x (what SCRFD's and
    most model tables call FLOPs)."""
    total = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0]
            total += output.numel() * per_output * module.kernel_size[1]
        else:
            total += output.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return total


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    outputs: list[str],
    spatial: bool,
) -> None:
    """ONNX with a free batch axis (and free height/width when `spatial`)."""
    axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    dynamic = {input_name: axes, **{o: {0: "batch"} for o in outputs}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[input_name],
            output_names=outputs,
            dynamic_axes=dynamic,
        )


def build_model_files(root: Path, seed: int = 0) -> dict:
    """Write an InsightFace pack and facexlib weights under `root`; return paths and sizes."""
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(seed)
    pack = root / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True, exist_ok=True)
    facts = {"insightface_root": str(root / "insightface"), "facexlib_root": str(root / "facexlib")}
    scrfd = ScrfdShaped().eval()
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in ScrfdShaped.strides]
    export(scrfd, torch.rand(1, 3, 640, 640), pack / "det_10g.onnx", "input.1", names, True)
    facts["scrfd"] = {
        "params": params(scrfd),
        "macs_640x480": count_macs(scrfd, torch.rand(1, 3, 480, 640)),
        "macs_640x640": count_macs(scrfd, torch.rand(1, 3, 640, 640)),
    }
    arcface = IResNet50().eval()
    export(
        arcface,
        torch.rand(2, 3, 112, 112),
        pack / "w600k_r50.onnx",
        "input.1",
        ["embedding"],
        False,
    )
    facts["arcface"] = {
        "params": params(arcface),
        "macs": count_macs(arcface, torch.rand(2, 3, 112, 112)) // 2,
    }
    genderage = GenderAgeShaped().eval()
    export(
        genderage, torch.rand(2, 3, 96, 96), pack / "genderage.onnx", "data", ["genderage"], False
    )
    facts["genderage"] = {
        "params": params(genderage),
        "macs": count_macs(genderage, torch.rand(2, 3, 96, 96)) // 2,
    }
    bisenet = BiSeNet(num_class=19).eval()
    (root / "facexlib").mkdir(parents=True, exist_ok=True)
    torch.save(bisenet.state_dict(), root / "facexlib" / "parsing_bisenet.pth")
    facts["bisenet"] = {
        "params": params(bisenet),
        "macs": count_macs(bisenet, torch.rand(1, 3, 512, 512)),
    }
    return facts
