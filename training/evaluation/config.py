"""Typed configuration of an evaluation run, and loading the generator it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from training.evaluation.metrics import MetricConfig
from training.evaluation.protocols import Generator

GeneratorKind = Literal["text-only", "consistentid", "faceclip"]


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: GeneratorKind = Field(
        "text-only",
        description="text-only: the base model ignoring the face (baseline.TextOnlyGenerator); "
        "consistentid / faceclip: the trained models",
    )
    base_model: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", description="diffusers hub name or folder"
    )
    weights: str | None = Field(
        None, description="trained weights: an exported folder or a checkpoint folder"
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword options of the generator's from_pretrained (steps, device, ...)",
    )


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_url: str = Field(description="a built dataset (folder or s3://): the references")
    out_dir: str = Field(description="images and tables are written here; rerun to resume")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    metrics: MetricConfig = Field(default_factory=MetricConfig)
    identities: int | None = Field(None, ge=1, description="references to use; None = all")
    reference_seed: int = Field(0, description="which image of each identity is its reference")
    prompts: str | None = Field(None, description="prompt file; None = the paper's 45 prompts")
    categories: list[str] | None = Field(None, description="only these prompt categories")
    per_category: int | None = Field(None, ge=1, description="only the first N prompts of each")
    seed: int = Field(0, description="generation seed, the same for every image")
    batch_size: int = Field(8, ge=1, description="images generated and scored per batch")

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvaluateConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def load_generator(config: GeneratorConfig) -> Generator:
    """Build the generator `config` names; the trained models' modules load only when asked."""
    if config.kind == "text-only":
        from training.evaluation.baseline import TextOnlyGenerator

        return TextOnlyGenerator.from_pretrained(config.base_model, **config.options)
    if config.weights is None:
        raise ValueError(f"a {config.kind} generator needs weights (an exported folder)")
    if config.kind == "consistentid":
        from training.consistentid.pipeline import ConsistentIDGenerator
        from training.consistentid.sdxl import ConsistentIDXLGenerator

        variant, base_model = consistentid_base(config)
        if Path(config.weights).is_file():  # ConsistentID-v1.bin or ConsistentID_SDXL-v1.bin
            return released_consistentid(config.model_copy(update={"base_model": base_model}))
        cls = ConsistentIDXLGenerator if variant == "sdxl" else ConsistentIDGenerator
        return cls.from_pretrained(base_model, config.weights, **config.options)
    from training.faceclip.pipeline import FaceCLIPGenerator

    return FaceCLIPGenerator.from_pretrained(config.base_model, config.weights, **config.options)


def consistentid_base(config: GeneratorConfig) -> tuple[str | None, str]:
    """(variant, base model) of a ConsistentID generator. The SDXL release, or a folder
    converted from it, runs on SDXL base 1.0 (a folder: the base it records) unless another
    base than the default is given (a config that went through a flow's parameters names the
    default); None: a file of another UNet's layers, whose base decides."""
    from training.consistentid.release import default_base, weights_variant

    variant, recorded = weights_variant(config.weights)
    default = GeneratorConfig.model_fields["base_model"].default
    given = "base_model" in config.model_fields_set and config.base_model != default
    if variant != "sdxl" or given:
        return variant, config.base_model
    return variant, recorded or default_base(variant)


def released_consistentid(config: GeneratorConfig) -> Generator:
    """A released ConsistentID checkpoint (SD 1.5 or SDXL) as a generator, loaded strictly in
    memory (no conversion on disk); its rows are named `consistentid-release` (SDXL:
    `consistentid-sdxl-release`) unless `name` is given."""
    import torch

    from training.consistentid.pipeline import ConsistentIDGenerator
    from training.consistentid.release import release_model
    from training.consistentid.sdxl import ConsistentIDXL, ConsistentIDXLGenerator

    options = dict(config.options)
    device = torch.device(
        options.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = options.pop("dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = release_model(config.weights, config.base_model, options.pop("image_encoder", None))
    model.to(device=device, dtype=dtype).eval()
    if isinstance(model, ConsistentIDXL):
        options.setdefault("name", "consistentid-sdxl-release")
        return ConsistentIDXLGenerator(model, config.base_model, **options)
    options.setdefault("name", "consistentid-release")
    return ConsistentIDGenerator(model, config.base_model, **options)
