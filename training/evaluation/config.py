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

        return ConsistentIDGenerator.from_pretrained(
            config.base_model, config.weights, **config.options
        )
    from training.faceclip.pipeline import FaceCLIPGenerator

    return FaceCLIPGenerator.from_pretrained(config.base_model, config.weights, **config.options)
