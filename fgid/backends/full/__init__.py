"""The `full` model set: the models the papers used (InsightFace buffalo_l, BiSeNet, LLaVA-1.5).

Importing this package is cheap; `load` pulls in onnxruntime, torch, facexlib and transformers.
Weights come from `config.models` (see ModelsConfig); nothing is downloaded when a local
root is given, and a missing file there is reported by name.
"""

from __future__ import annotations

import logging

from fgid.config import BuildConfig
from fgid.protocols import ModelSet

logger = logging.getLogger(__name__)


def load(config: BuildConfig) -> ModelSet:
    """Load every backend once; the caller reuses the set for all shards of a process."""
    from fgid.backends.full.bisenet import BiSeNetParser
    from fgid.backends.full.device import insightface_providers, torch_device
    from fgid.backends.full.insightface_models import (
        DETECTOR_FILE,
        GENDERAGE_FILE,
        RECOGNIZER_FILE,
        InsightFaceAttributes,
        InsightFaceDetector,
        InsightFaceEmbedder,
        model_dir,
    )
    from fgid.backends.full.llava import LlavaCaptioner

    device = torch_device(config.models.device)
    providers = insightface_providers(config.models)
    pack = model_dir(config, (DETECTOR_FILE, RECOGNIZER_FILE, GENDERAGE_FILE))
    logger.info("full model set: InsightFace pack %s, torch device %s", pack, device)
    return ModelSet(
        detector=InsightFaceDetector(pack, providers, config),
        parser=BiSeNetParser(config, device),
        embedder=InsightFaceEmbedder(pack, providers, config),
        attributes=InsightFaceAttributes(pack, providers, config),
        captioner=LlavaCaptioner(config, device),
    )
