"""LLaVA-1.5 captioner (llava-hf checkpoints): one greedy answer per aligned crop and prompt.

`caption.engine` picks what runs the model: transformers (here; any device) or vLLM
(fgid.backends.full.vllm_captioner; a CUDA GPU). Both send the prompt `llava_prompt` builds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from fgid.backends.full.llava_prompt import llava_prompt as llava_prompt  # both engines send it
from fgid.config import BuildConfig

logger = logging.getLogger(__name__)


def model_source(value: str) -> str:
    """A local model dir (checked) or a hub id (left to the engine).

    A value that looks like a path must exist: otherwise it would be read as a hub id and fail
    with a network error that hides the typo."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"LLaVA model dir {path} has no config.json (models.llava)")
        return str(path)
    if path.is_absolute() or value.startswith((".", "~")) or path.exists():
        raise FileNotFoundError(f"LLaVA model dir {path} not found (models.llava)")
    return value


class Engine(Protocol):
    commit: str | None  # the checkpoint's hub revision, when it came from the hub
    tag: str  # appended to the captioner's name: "" for transformers

    def generate(self, images: list[np.ndarray], questions: list[str]) -> list[list[str]]:
        """One list of answers (one per image) for each question."""
        ...


class LlavaCaptioner:
    """Greedy LLaVA answers; `hints` are ignored (the model sees only the image)."""

    def __init__(self, config: BuildConfig, device: str):
        source = model_source(config.models.llava)
        if config.caption.engine == "vllm":
            from fgid.backends.full.vllm_captioner import VllmEngine

            self.engine: Engine = VllmEngine(source, config, device)
        else:
            self.engine = TransformersEngine(source, config, device)
        label = Path(source).name if Path(source).is_dir() else source
        commit = self.engine.commit
        self.name = f"llava:{label}" + (f"@{commit[:12]}" if commit else "") + self.engine.tag
        logger.info("loaded %s on %s (%s)", self.name, device, config.caption.engine)

    def caption(self, images: list[np.ndarray], prompt: str, hints: list[dict]) -> list[str]:
        return self.engine.generate(images, [prompt])[0]

    def caption_many(
        self, images: list[np.ndarray], prompts: list[str], hints: list[dict]
    ) -> list[list[str]]:
        """Every prompt for every image at once: one list of answers per prompt."""
        return self.engine.generate(images, prompts)


class TransformersEngine:
    """transformers' LlavaForConditionalGeneration: batches of `caption.batch_size`, one prompt
    at a time, left-padded."""

    tag = ""

    def __init__(self, source: str, config: BuildConfig, device: str):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        # fp16 is how LLaVA-1.5-7B is run on GPUs; CPUs lack fast fp16 kernels.
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.device = device
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            model = LlavaForConditionalGeneration.from_pretrained(source, dtype=self.dtype)
        except OSError as error:
            raise OSError(
                f"could not load LLaVA from {source!r} (models.llava: a hub id or a local dir "
                f"with config.json, processor and weights): {error}"
            ) from error
        self.model = model.to(device).eval()
        tokenizer = self.processor.tokenizer
        # Decoder-only batching: pad on the left so every prompt ends where generation starts.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.max_new_tokens = config.caption.max_new_tokens
        self.batch_size = config.caption.batch_size
        self.commit = getattr(model.config, "_commit_hash", None)

    def generate(self, images: list[np.ndarray], questions: list[str]) -> list[list[str]]:
        answers: list[list[str]] = []
        for question in questions:
            texts: list[str] = []
            for start in range(0, len(images), self.batch_size):
                texts.extend(self._generate(images[start : start + self.batch_size], question))
            answers.append(texts)
        return answers

    def _generate(self, images: list[np.ndarray], question: str) -> list[str]:
        import torch
        from PIL import Image

        inputs = self.processor(
            images=[Image.fromarray(img) for img in images],
            text=[llava_prompt(question)] * len(images),
            padding=True,
            return_tensors="pt",
        ).to(self.device, dtype=self.dtype)
        tokenizer = self.processor.tokenizer
        with torch.inference_mode():
            # The reference settings: temperature 0 (greedy), one beam.
            out = self.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
