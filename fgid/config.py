"""Typed build configuration: one section per stage, loadable from YAML, hashed for provenance."""

from __future__ import annotations

import collections.abc
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fgid.errors import UsageError


class ConfigError(UsageError):
    """A setting that does not exist, or a config file that cannot be read; one line."""


def check_setting(model: type[BaseModel], dotted: str) -> None:
    """Refuse `section.field` unless it names a setting of `model`, suggesting the nearest one.

    Below a free-form mapping field (e.g. a generator's `options`) any name is accepted."""
    node: type[BaseModel] | None = model
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        fields = node.model_fields if node else {}
        if part not in fields:
            prefix = ".".join(parts[:depth])
            known = [f"{prefix}.{name}" if prefix else name for name in fields]
            close = difflib.get_close_matches(dotted, _all_settings(model), n=1, cutoff=0.6)
            close = close or difflib.get_close_matches(
                ".".join(parts[: depth + 1]), known, n=1, cutoff=0.6
            )
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting {dotted}{hint}")
        node = _section(fields[part].annotation)
        if node is _MAPPING:
            return
        if node is None and depth < len(parts) - 1:
            raise ConfigError(
                f"unknown setting {dotted}: {'.'.join(parts[: depth + 1])} is a value"
            )


_MAPPING = object()  # a dict-typed field: its keys are the user's


def _section(annotation: object):
    """The settings class a field holds (also inside `X | None`), _MAPPING for a dict, or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        return _MAPPING
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section(arg)
            if found is not None:
                return found
    return None


def _all_settings(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        if isinstance(section, type):
            names += _all_settings(section, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def describe_error(error: ValidationError) -> str:
    """A pydantic error as one line: `shard_size: must be >= 1 (got 0); ...`."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown setting {where}")
            continue
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{where}: {item['msg']}{shown}")
    return "; ".join(parts)


def read_yaml(path: str | Path, limit: int = 1_000_000) -> dict:
    """A YAML mapping from a small regular file, or a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists()
                          else f"config is not a regular file: {path}")  # fmt: skip
    with open(path, "rb") as handle:
        text = handle.read(limit + 1)
    if len(text) > limit:
        raise ConfigError(f"config file is larger than {limit} bytes: {path}")
    try:
        data = yaml.safe_load(text.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {path}{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecodeConfig(Section):
    min_side: int = Field(64, description="images with a shorter side are rejected as too_small")
    max_pixels: int = Field(
        60_000_000, description="larger images are rejected as too_large before decoding"
    )
    max_bytes: int = Field(100_000_000, description="larger files are rejected unread")
    memory_budget_mb: int = Field(
        1024,
        ge=1,
        description="decoded pixel bytes held by read-ahead and decode threads together; a "
        "batch ahead waits past it (the batch the models need next never does)",
    )


class DetectConfig(Section):
    min_score: float | None = Field(
        None,
        description="drop faces scoring below this; None = the detector's own threshold "
        "(SCRFD probability 0.5, dlib HOG SVM margin 0.3)",
    )
    min_face_size: int = Field(40, description="primary faces with a smaller box side are rejected")
    max_faces: int = Field(0, description="reject images with more faces than this; 0 = no limit")
    det_size: tuple[int, int] = Field((640, 640), description="InsightFace detector input size")
    upsample: int = Field(1, description="dlib HOG upsampling (finds smaller faces, slower)")
    max_side: int = Field(
        1024, description="lite detector: images are downscaled to this side for detection"
    )


class AlignConfig(Section):
    size: int = Field(512, description="side of the FFHQ-style aligned crop")
    jpeg_quality: int = 95


class CaptionConfig(Section):
    max_new_tokens: int = 512
    batch_size: int = 8
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="how LLaVA runs: transformers (any device) or vllm (a CUDA GPU; "
        "pip install vllm); the same prompts, greedy, on either",
        # Part of the output hash: greedy answers can differ between engines (other kernels,
        # other batching), so one output folder never mixes shards captioned by both. Left out
        # of dumps when it is the default, so configs and hashes from before the setting existed
        # stay the same and their builds still resume.
        exclude_if=lambda engine: engine == "transformers",
    )


class GroupConfig(Section):
    # Documented in ARCHITECTURE.md: identity threshold per embedding family.
    metric: Literal["euclidean", "cosine"] | None = Field(
        None, description="distance for clustering; None = the model set's default"
    )
    threshold: float | None = Field(
        None,
        description="max distance between a face and an identity centroid; None = model default "
        "(dlib 128-d: euclidean 0.6; ArcFace 512-d: cosine 0.6, i.e. similarity 0.4)",
    )
    near_duplicate: float | None = Field(
        None,
        description="max distance to flag a near duplicate; None = model default "
        "(dlib: euclidean 0.15; ArcFace: cosine 0.05)",
    )


class ModelsConfig(Section):
    set: Literal["lite", "full"] = "full"
    # full set: where weights live. None = the libraries' default locations/download.
    insightface_root: str | None = Field(
        None, description="dir holding models/<name>/*.onnx (InsightFace layout)"
    )
    insightface_name: str = "buffalo_l"
    facexlib_root: str | None = Field(None, description="dir holding parsing_bisenet.pth")
    llava: str = Field("llava-hf/llava-1.5-7b-hf", description="hub id or local dir")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    # The three settings below are part of the output hash only when changed from their default
    # (as caption.engine): another runtime or precision gives slightly other numbers, and configs
    # and hashes from before the settings existed stay the same, so their builds still resume.
    runtime: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="how the InsightFace models run: auto = torch on CUDA (converted from their "
        "ONNX files at load), onnxruntime on the CPU",
        exclude_if=lambda runtime: runtime == "auto",
    )
    torch_precision: Literal["auto", "float32", "float16"] = Field(
        "auto",
        description="InsightFace models under torch: auto = float16 on CUDA, float32 on the CPU",
        exclude_if=lambda precision: precision == "auto",
    )
    torch_compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off",
        description="torch.compile mode for the InsightFace models under torch "
        "(reduce-overhead adds CUDA graphs)",
        exclude_if=lambda mode: mode == "off",
    )


class InputsConfig(Section):
    """Which columns of an input table (URL table, Parquet image dataset) mean what."""

    url_column: str = Field("url", description="URL tables: the column of image URLs")
    caption_column: str | None = Field(
        None, description="a column kept as the source caption (index source_caption)"
    )
    label_column: str | None = Field(
        None, description="a column holding the identity label (as --labels does for files)"
    )
    license_column: str | None = Field(
        None, description="a column kept as the source licence (index source_license)"
    )
    image_column: str | None = Field(
        None,
        description="Parquet image datasets: the column of image bytes ({bytes, path} structs "
        "as Hugging Face datasets writes them, or binary); None = the only such column",
    )


class DownloadConfig(Section):
    """How http(s) sources are fetched (fgid.download)."""

    concurrency: int = Field(16, ge=1, description="downloads of one batch at once")
    timeout: float = Field(
        10.0, gt=0, description="seconds for one request: connection, headers and body"
    )
    retries: int = Field(
        2, ge=0, le=10, description="retries after a timeout, connection error, 429 or 5xx"
    )
    backoff: float = Field(
        0.5, ge=0, description="seconds before the first retry, doubled for each next one"
    )
    user_agent: str | None = Field(
        None, description="User-Agent header; None = fgid/<version> with the project address"
    )
    # Content settings: part of the output hash only when changed from the default, so configs
    # and hashes from before downloads existed stay the same and their builds still resume.
    max_bytes: int | None = Field(
        None,
        ge=1,
        description="larger downloads are stopped and rejected; None = decode.max_bytes",
        exclude_if=lambda value: value is None,
    )
    honour_opt_out: bool = Field(
        True,
        description="reject images whose server sends X-Robots-Tag noai, noimageai, noindex, "
        "noimageindex or none (img2dataset's directives)",
        exclude_if=lambda value: value is True,
    )
    private_addresses: bool = Field(
        False,
        description="also fetch from loopback, private, link-local and other non-public "
        "addresses (a server on your own network, or a proxy on one); off, a URL table cannot "
        "make a build reach this machine, its network or a cloud metadata service",
        exclude_if=lambda value: value is False,
    )


class BuildConfig(Section):
    shard_size: int = Field(1000, ge=1, description="inputs per shard")
    batch_size: int = Field(16, ge=1, description="images per stage call")
    workers: int = Field(1, ge=1, description="shards processed at once (Prefect task runner)")
    prefetch_batches: int = Field(
        2, ge=0, description="batches decoded ahead while the model stages run; 0 = in turn"
    )
    decode_workers: int = Field(4, ge=1, description="threads decoding the images of a batch")
    labels: str | None = Field(
        None, description="identity label file, lines '<file name> <identity>' (CelebA format)"
    )
    decode: DecodeConfig = DecodeConfig()
    detect: DetectConfig = DetectConfig()
    align: AlignConfig = AlignConfig()
    caption: CaptionConfig = CaptionConfig()
    group: GroupConfig = GroupConfig()
    models: ModelsConfig = ModelsConfig()
    inputs: InputsConfig = InputsConfig()
    download: DownloadConfig = DownloadConfig()

    @classmethod
    def from_yaml(cls, path: str | Path) -> BuildConfig:
        return cls.model_validate(read_yaml(path))

    def with_overrides(self, **dotted: object) -> BuildConfig:
        """Apply `section.field=value` overrides (CLI), validating the result."""
        data = self.model_dump()
        for dotted_key, value in dotted.items():
            check_setting(BuildConfig, dotted_key)
            node = data
            *parents, leaf = dotted_key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return BuildConfig.model_validate(data)

    def output_hash(self) -> str:
        """Hash of every setting that changes what a shard contains (not how fast it is made).

        Recorded in every sample; a rerun with a different hash refuses to mix shards."""
        speed = {"workers", "batch_size", "prefetch_batches", "decode_workers"}
        data = self.model_dump(mode="json", exclude=speed)
        data["caption"].pop("batch_size")
        data["models"].pop("device")
        data["decode"].pop("memory_budget_mb")  # how much is decoded at once, not what
        # Which inputs and columns are read is checked against the recorded plan instead; of
        # the download settings only the content ones count, and only when changed.
        data.pop("inputs")
        download = data.pop("download")
        content = {
            k: download[k]
            for k in ("max_bytes", "honour_opt_out", "private_addresses")
            if k in download
        }
        if content:
            data["download"] = content
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
