"""LLaVA-1.5 captioner (transformers' llava-hf port): one greedy answer per aligned crop."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fgid.config import BuildConfig

logger = logging.getLogger(__name__)

# The conversation template the llava-hf LLaVA-1.5 checkpoints were converted with.
PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def model_source(value: str) -> str:
    """A local model dir (checked) or a hub id (left to transformers).

    A value that looks like a path must exist: otherwise transformers would read it as a hub id
    and fail with a network error that hides the typo."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"LLaVA model dir {path} has no config.json (models.llava)")
        return str(path)
    if path.is_absolute() or value.startswith((".", "~")) or path.exists():
        raise FileNotFoundError(f"LLaVA model dir {path} not found (models.llava)")
    return value


class LlavaCaptioner:
    """Greedy, batched LLaVA generation; `hints` are ignored (the model sees only the image)."""

    def __init__(self, config: BuildConfig, device: str):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        source = model_source(config.models.llava)
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
        commit = getattr(model.config, "_commit_hash", None)
        label = Path(source).name if Path(source).is_dir() else source
        self.name = f"llava:{label}" + (f"@{commit[:12]}" if commit else "")
        logger.info("loaded %s on %s (%s)", self.name, device, self.dtype)

    def caption(self, images: list[np.ndarray], prompt: str, hints: list[dict]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(images), self.batch_size):
            answers.extend(self._generate(images[start : start + self.batch_size], prompt))
        return answers

    def _generate(self, images: list[np.ndarray], prompt: str) -> list[str]:
        import torch
        from PIL import Image

        text = PROMPT_TEMPLATE.format(prompt=prompt)
        inputs = self.processor(
            images=[Image.fromarray(img) for img in images],
            text=[text] * len(images),
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
