"""The weights training and evaluation load: base models, encoders, metric backbones, FID."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from fgid.config import ModelsConfig
from fgid.weights import (
    Weight,
    build_weights,
    diffusers_files,
    hub_weight,
    transformers_files,
)

if TYPE_CHECKING:
    from training.consistentid.train import ConsistentIDTrainConfig
    from training.evaluation.config import EvaluateConfig
    from training.faceclip.train import FaceCLIPTrainConfig

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
CLIP_L = "openai/clip-vit-large-patch14"
DINO = "facebook/dino-vits16"

_TEXT = (("tokenizer/vocab.json",), ("tokenizer/merges.txt",), *transformers_files("text_encoder"))
_TEXT_2 = (
    ("tokenizer_2/vocab.json",),
    ("tokenizer_2/merges.txt",),
    *transformers_files("text_encoder_2"),
)
_UNET_VAE = (
    ("model_index.json",),
    ("scheduler/scheduler_config.json",),
    *diffusers_files("unet"),
    *diffusers_files("vae"),
)
SD15_FILES = (*_UNET_VAE, *_TEXT)
SDXL_TEXT_FILES = (*_TEXT, *_TEXT_2)
SDXL_FILES = (*_UNET_VAE, *_TEXT, *_TEXT_2)
# Only the files the pipelines load: the repositories also hold fp16, EMA and single-file copies.
_PIPELINE_ALLOW = (
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "feature_extractor/*",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
)
_MODEL_ALLOW = ("*.json", "*.txt", "model.safetensors")
SD15_LICENCE = "CreativeML OpenRAIL-M"


def _sd15(source: str, used_by: str, setting: str) -> Weight:
    return hub_weight(
        "sd15", "Stable Diffusion 1.5", used_by, source, SD15, setting, "4.3 GB",
        SD15_LICENCE, SD15_FILES, _PIPELINE_ALLOW,
    )  # fmt: skip


def _sdxl(source: str, used_by: str, setting: str, text_only: bool = False) -> Weight:
    files = SDXL_TEXT_FILES if text_only else SDXL_FILES
    return hub_weight(
        "sdxl", "SDXL base 1.0", used_by, source, SDXL, setting, "14 GB",
        "CreativeML Open RAIL++-M", files, _PIPELINE_ALLOW,
    )  # fmt: skip


def _clip_l(source: str, used_by: str, setting: str) -> Weight:
    return hub_weight(
        "clip-l", "CLIP ViT-L/14", used_by, source, CLIP_L, setting, "1.7 GB", "MIT",
        transformers_files(), _MODEL_ALLOW,
    )  # fmt: skip


def _file(key: str, name: str, used_by: str, path: str, setting: str, size: str, licence: str,
          command: str, is_folder: bool = False) -> Weight:  # fmt: skip
    found = Path(path).expanduser()
    present = found.is_dir() if is_folder else found.is_file()
    return Weight(key, name, used_by, path, setting, size, licence, present, None, command)


# --- ConsistentID --------------------------------------------------------------------------------


def consistentid_weights(
    base_model: str, image_encoder: str | None, sdxl: bool = False
) -> list[Weight]:
    """`sdxl`: ConsistentID-SDXL on an SDXL base."""
    from training.consistentid.model import VIT_H, image_encoder_source

    used_by = "train consistentid"
    rows = [(_sdxl if sdxl else _sd15)(base_model, used_by, "base_model (--base-model)")]
    source, nested = image_encoder_source(base_model, image_encoder)
    files = transformers_files("image_encoder" if nested else "")
    rows.append(
        hub_weight(
            "clip-h", "CLIP ViT-H/14 image encoder", used_by, source, VIT_H, "image_encoder",
            "3.9 GB", "MIT", files, _MODEL_ALLOW,
        )
    )  # fmt: skip
    return rows


# --- FaceCLIP ------------------------------------------------------------------------------------


def face_encoder_weight(path: str | None, used_by: str) -> Weight:
    weight = _file(
        "face-vit", "FaceCLIP face encoder (arcface_torch ViT-L)", used_by,
        path or "(not set)", "face_encoder", "1.2 GB",
        "InsightFace arcface_torch: non-commercial research only",
        "download an arcface_torch ViT-L checkpoint and set face_encoder to it",
    )  # fmt: skip
    if path is None:
        # A random face encoder is how tests run; the trainer logs that it is one.
        return dataclasses.replace(weight, note="not set: random init")
    return weight


def faceclip_release_weight(path: str, used_by: str, setting: str) -> Weight:
    return _file(
        "faceclip-release", "FaceCLIP-SDXL release (face_clip_encoder.pt [+ unet.pt])", used_by,
        path, setting, "5.4 GB + 10 GB", "CC BY-NC 4.0 (weights), Apache-2.0 (code)",
        "download model/ from the ByteDance/FaceCLIP hub repository",
        is_folder=Path(path).expanduser().is_dir(),
    )  # fmt: skip


def metaclip_weight(used_by: str) -> Weight:
    """The towers' MetaCLIP weights, which open_clip downloads into its own cache."""
    return Weight(
        "metaclip", "open_clip ViT-L-14-quickgelu + ViT-bigG-14 (metaclip_fullcc)", used_by,
        "(open_clip cache)", "towers[].pretrained", "1.7 GB + 10 GB", "CC BY-NC 4.0", True,
        None, "downloaded by open_clip at first use", note="fetched by open_clip",
    )  # fmt: skip


def faceclip_weights(
    stage: str,
    base_model: str,
    face_encoder: str | None,
    image_model: str | None,
    encoder_weights: str | None,
    init_from_reference: str | None = None,
) -> list[Weight]:
    used_by = f"train faceclip ({stage})"
    rows = []
    if stage == "sdxl":  # the align stage reads no SDXL weights
        rows.append(_sdxl(base_model, used_by, "base_model (--base-model)"))
    if init_from_reference:
        rows.append(faceclip_release_weight(init_from_reference, used_by, "init_from_reference"))
    else:
        rows += [metaclip_weight(used_by), face_encoder_weight(face_encoder, used_by)]
    if stage == "align" and image_model:
        rows.append(_clip_l(image_model, used_by, "image_model"))
    if stage == "sdxl" and encoder_weights:
        rows.append(
            _file(
                "trained", "FaceCLIP encoder (align stage's final/)", used_by, encoder_weights,
                "encoder_weights", "-", "yours", "fgid train faceclip --stage align",
                is_folder=True,
            )
        )  # fmt: skip
    return rows


# --- evaluation ----------------------------------------------------------------------------------


FACENET_URL = (
    "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
    "20180402-114759-vggface2.pt"
)


def facenet_path(setting: str | None = None) -> Path:
    """The FaceNet VGGFace2 file: the setting, else where facenet-pytorch keeps it
    ($TORCH_HOME/checkpoints)."""
    import os

    if setting:
        return Path(setting).expanduser()
    cache = os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    home = Path(os.getenv("TORCH_HOME", cache)).expanduser()
    return home / "checkpoints" / Path(FACENET_URL).name


def _fetch_facenet() -> object:
    import torch

    path = facenet_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(FACENET_URL, str(path))
    return path


def facenet_weight(setting: str | None) -> Weight:
    path = facenet_path(setting)
    return Weight(
        "facenet", "FaceNet Inception-ResNet-v1 (VGGFace2, facenet-pytorch release)",
        "evaluate (FaceSim)", str(path), "metrics.facenet", "107 MB",
        "MIT (facenet-pytorch); VGGFace2 terms for the data", path.is_file(),
        None if setting else _fetch_facenet, "fgid models download facenet",
        note="" if path.is_file() else "absent: FaceSim is n/a, FaceSim-ArcFace still scored",
    )  # fmt: skip


def inception_path() -> Path:
    """Where torch hub keeps pytorch-fid's Inception weights ($TORCH_HOME/hub/checkpoints)."""
    import torch
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(FID_WEIGHTS_URL).name


def _fetch_inception() -> object:
    import torch
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True)


def evaluation_weights(
    kind: str,
    base_model: str,
    weights: str | None,
    clip: str,
    dino: str,
    fid: str,
    faces: ModelsConfig,
    facenet: str | None = None,
    sdxl: bool = False,
) -> list[Weight]:
    """`sdxl`: a ConsistentID generator on SDXL (its released SDXL file)."""
    used_by = f"evaluate ({kind})"
    setting = "generator.base_model (--base-model)"
    base = _sdxl if kind == "faceclip" or sdxl else _sd15
    rows = [base(base_model, used_by, setting)]
    from training.faceclip.convert import is_release

    if kind == "faceclip" and weights and is_release(weights):
        rows.append(faceclip_release_weight(weights, used_by, "generator.weights (--weights)"))
    elif kind == "consistentid" and weights and Path(weights).is_file():
        release = "ConsistentID_SDXL-v1.bin" if sdxl else "ConsistentID-v1.bin"
        rows.append(
            _file(
                "consistentid-release", f"ConsistentID release ({release})", used_by,
                weights, "generator.weights (--weights)", "1.1 GB" if not sdxl else "-", "MIT",
                f"download {release} from the JackAILab/ConsistentID hub repository",
            )
        )  # fmt: skip
    elif kind != "text-only" and weights:
        rows.append(
            _file(
                "trained", f"trained {kind} weights", used_by, weights,
                "generator.weights (--weights)", "-", "yours", f"fgid train {kind}",
                is_folder=True,
            )
        )  # fmt: skip
    rows.append(_clip_l(clip, "evaluate (CLIP-T, CLIP-I)", "metrics.clip (--clip)"))
    rows.append(facenet_weight(facenet))
    rows.append(
        hub_weight(
            "dino", "DINO ViT-S/16", "evaluate (DINO, FGIS)", dino, DINO, "metrics.dino (--dino)",
            "87 MB", "Apache-2.0", transformers_files(), ("*.json", "pytorch_model.bin"),
        )
    )  # fmt: skip
    if fid == "inception":
        path = inception_path()
        rows.append(
            Weight(
                "inception", "FID Inception-v3 (pytorch-fid)", "evaluate (FID)", str(path),
                "TORCH_HOME (environment), metrics.fid", "91 MB", "Apache-2.0", path.is_file(),
                _fetch_inception, "fgid models download inception",
            )
        )  # fmt: skip
    for row in build_weights(faces):
        rows.append(
            dataclasses.replace(
                row,
                used_by="evaluate (FaceSim, FGIS)",
                setting=row.setting.replace("models.", "metrics.faces.", 1),
            )
        )
    return rows


# --- from configs ---------------------------------------------------------------------------------


def for_consistentid(config: ConsistentIDTrainConfig) -> list[Weight]:
    """`config` with its variant resolved (training.consistentid.train.resolve_variant)."""
    sdxl = config.variant == "sdxl"
    return consistentid_weights(config.base_model, config.image_encoder, sdxl)


def for_faceclip(config: FaceCLIPTrainConfig) -> list[Weight]:
    return faceclip_weights(
        config.stage, config.base_model, config.face_encoder, config.image_model,
        config.encoder_weights, config.init_from_reference,
    )  # fmt: skip


def for_evaluation(config: EvaluateConfig) -> list[Weight]:
    g, m = config.generator, config.metrics
    base_model, sdxl = g.base_model, False
    if g.kind == "consistentid" and g.weights:
        from training.evaluation.config import consistentid_base

        variant, base_model = consistentid_base(g)
        sdxl = variant == "sdxl"
    return evaluation_weights(
        g.kind, base_model, g.weights, m.clip, m.dino, m.fid, m.faces, m.facenet, sdxl
    )


def default_weights(faces: ModelsConfig | None = None) -> list[Weight]:
    """Every weight the default training and evaluation settings load (`fgid models`);
    FaceSim and FGIS with the full set as `faces` configures it."""
    from training.evaluation.metrics import MetricConfig

    metrics = MetricConfig()
    rows = consistentid_weights(SD15, None)
    rows += faceclip_weights("align", SDXL, None, CLIP_L, None)
    rows += faceclip_weights("sdxl", SDXL, None, None, None)
    for kind in ("text-only", "faceclip"):
        base = SDXL if kind == "faceclip" else SD15
        rows += evaluation_weights(
            kind, base, None, metrics.clip, metrics.dino, metrics.fid, faces or metrics.faces
        )
    return rows


def merged(rows: list[Weight]) -> list[Weight]:
    """One row per file or model: where several commands load it, the row names them all, and
    it is present only if every command finds what it needs there."""
    out: dict[str, Weight] = {}
    seen: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        first = out.get(row.where)
        if first is None:
            out[row.where] = dataclasses.replace(row)
            seen[row.where] = {"used_by": [row.used_by], "setting": [row.setting]}
            continue
        first.present = first.present and row.present
        for name, values in seen[row.where].items():
            if getattr(row, name) not in values:
                values.append(getattr(row, name))
                setattr(first, name, ", ".join(values))
    return list(out.values())
