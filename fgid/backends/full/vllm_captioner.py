"""LLaVA-1.5 on vLLM's offline engine (`caption.engine: vllm`): a batch's prompts in one call.

vLLM schedules every (image, prompt) request of a call together (continuous batching, paged KV
cache), which is where its speed over transformers' padded batches comes from. It needs a CUDA
GPU and the `vllm` package, which is not a dependency of fgid: selecting the engine without it
fails when the model set loads, naming the package.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from fgid.backends.full.llava_prompt import llava_prompt
from fgid.config import BuildConfig

logger = logging.getLogger(__name__)

PACKAGE = "vllm"
# The share of the GPU vLLM reserves up front (weights, activations, KV cache). The rest is for
# the full set's other models, which share the device during a build (InsightFace in ONNX
# Runtime, BiSeNet in torch) and allocate after vLLM has taken its share.
GPU_MEMORY_SHARE = 0.8


class EngineUnavailable(ImportError):
    """`caption.engine` names an engine this environment cannot run."""


def import_vllm():
    """The vllm module, or EngineUnavailable saying what to install."""
    try:
        import vllm
    except ModuleNotFoundError as error:
        if error.name != PACKAGE:
            raise
        raise EngineUnavailable(
            f"caption.engine=vllm needs the '{PACKAGE}' package, which is not installed: "
            f"pip install {PACKAGE} (Linux with a CUDA GPU), or set caption.engine=transformers"
        ) from error
    return vllm


def vllm_requests(images: list[np.ndarray], questions: list[str]) -> list[dict]:
    """One prompt dict per (question, image), question-major: every image with the first
    question, then every image with the next."""
    from PIL import Image

    pictures = [Image.fromarray(image).convert("RGB") for image in images]
    return [
        {"prompt": llava_prompt(question), "multi_modal_data": {"image": picture}}
        for question in questions
        for picture in pictures
    ]


def split_answers(texts: list[str], images: int, questions: int) -> list[list[str]]:
    """Undo `vllm_requests`' order: one list of `images` answers per question."""
    if len(texts) != images * questions:
        raise ValueError(f"{len(texts)} answers for {images} images x {questions} prompts")
    return [texts[q * images : (q + 1) * images] for q in range(questions)]


def checkpoint_commit(source: str) -> str | None:
    """The hub revision of the checkpoint's config (None for a local dir), as transformers
    reports it: the same provenance the transformers engine records."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(source), "_commit_hash", None)


class VllmEngine:
    """vLLM's `LLM.generate`, greedy (temperature 0), up to `caption.max_new_tokens` tokens."""

    def __init__(self, source: str, config: BuildConfig, device: str):
        vllm = import_vllm()
        if not device.startswith("cuda"):
            raise RuntimeError(
                f"caption.engine=vllm runs on a CUDA GPU, but models.device is {device!r}; "
                "use caption.engine=transformers on this machine"
            )
        if device not in ("cuda", "cuda:0"):
            raise ValueError(
                f"vLLM runs on the first visible GPU: instead of models.device={device!r}, set "
                f"CUDA_VISIBLE_DEVICES={device.split(':', 1)[1]} and models.device=cuda"
            )
        # The engine in this process, not a child: vLLM's condition for repeatable offline
        # scheduling, and daemonic workers (Dask's) may not start processes of their own.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = vllm.LLM(
            model=source,
            dtype="float16",  # as the transformers engine runs LLaVA on a GPU
            seed=0,
            limit_mm_per_prompt={"image": 1},
            # A cached prefix makes an answer depend on which requests ran before it.
            enable_prefix_caching=False,
            gpu_memory_utilization=GPU_MEMORY_SHARE,
        )
        self.sampling = vllm.SamplingParams(
            temperature=0.0, max_tokens=config.caption.max_new_tokens
        )
        self.commit = checkpoint_commit(source)
        self.tag = f"+vllm-{vllm.__version__}"
        logger.info("vLLM %s engine for %s", vllm.__version__, source)

    def generate(self, images: list[np.ndarray], questions: list[str]) -> list[list[str]]:
        if not images:
            return [[] for _ in questions]
        outputs = self.llm.generate(
            vllm_requests(images, questions), sampling_params=self.sampling, use_tqdm=False
        )
        texts = [output.outputs[0].text.strip() for output in outputs]
        return split_answers(texts, len(images), len(questions))
