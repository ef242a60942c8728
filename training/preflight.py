"""What a training or evaluation run checks before it loads anything: its dataset and weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fgid.errors import UsageError
from fgid.weights import require
from training import weights

if TYPE_CHECKING:
    from training.consistentid.train import ConsistentIDTrainConfig
    from training.evaluation.config import EvaluateConfig
    from training.faceclip.train import FaceCLIPTrainConfig

# ConsistentID's ID projection takes InsightFace's 512-d ArcFace embedding (FGID_SPEC §5).
CONSISTENTID_ID_DIM = 512


class DatasetUnusable(UsageError):
    """The dataset cannot feed this run; the message says why and what to do, in one line."""


def dataset_summary(url: str) -> dict:
    """summary.json of a finished build with at least one kept sample."""
    from fgid.dataset import Dataset, NotADataset

    try:
        summary = Dataset(url).summary()
    except NotADataset:
        raise DatasetUnusable(
            f"{url} is not a finished fgid build (no summary.json): build one with "
            f"`fgid build INPUTS --out {url}`, or let that build finish"
        ) from None
    if not summary.get("samples"):
        raise DatasetUnusable(
            f"{url} has no kept samples ({summary.get('rejected', 0)} rejected): nothing to "
            f"train or evaluate on; `fgid inspect {url}` shows why they were rejected"
        )
    return summary


def consistentid_id_dim(url: str, id_dim: int | None) -> int:
    """The ID embedding width to train with: the dataset's, which must be 512-d unless the config
    asks for another width on purpose (a model no released ConsistentID weights fit)."""
    dim = dataset_summary(url).get("embedding_dim")
    if not dim:
        raise DatasetUnusable(f"{url} records no embedding width (embedding_dim in summary.json)")
    if id_dim is None and dim != CONSISTENTID_ID_DIM:
        raise DatasetUnusable(
            f"ConsistentID needs {CONSISTENTID_ID_DIM}-d ArcFace identity embeddings (a full "
            f"build); {url} has {dim}-d ones (a lite build): rebuild it with --models full, or "
            f"set id_dim={dim} to train a model of that width anyway"
        )
    if id_dim is not None and id_dim != dim:
        raise DatasetUnusable(
            f"id_dim={id_dim} but {url} has {dim}-d identity embeddings: set id_dim={dim} or "
            "leave it unset"
        )
    return int(dim)


def check_consistentid(config: ConsistentIDTrainConfig) -> int:
    """Refuse before loading: returns the ID width to train with."""
    dim = consistentid_id_dim(config.dataset_url, config.id_dim)
    require(weights.for_consistentid(config))
    return dim


def check_faceclip(config: FaceCLIPTrainConfig) -> None:
    dataset_summary(config.dataset_url)
    if config.stage == "sdxl" and not config.encoder_weights:
        raise UsageError(
            "the sdxl stage needs encoder_weights: the align stage's final/ folder "
            "(--set encoder_weights=RUN/final)"
        )
    require(weights.for_faceclip(config))


def check_evaluation(config: EvaluateConfig) -> None:
    dataset_summary(config.dataset_url)
    generator = config.generator
    if generator.kind != "text-only" and not generator.weights:
        raise UsageError(f"a {generator.kind} generator needs trained weights: --weights RUN/final")
    require(weights.for_evaluation(config))
