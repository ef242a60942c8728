"""Two captions per image with the spec's prompts, stored raw, journaled so a crash keeps them.

In a build, each batch's captions go to the shard's journal (`shard_paths(...)["journal"]`)
before the shard is committed; a rerun after a crash takes them from there instead of asking the
captioner again (LLaVA spends seconds per caption), and the shard comes out byte-identical.
"""

from __future__ import annotations

import hashlib
import json

from fgid.captioning.journal import Journal
from fgid.config import BuildConfig
from fgid.protocols import Captioner
from fgid.sample import Sample
from fgid.schema import CAPTION_PROMPT, FACIAL_PROMPT
from fgid.stages.base import Stage

# Sample field -> the prompt that fills it.
PROMPTS = {"caption": CAPTION_PROMPT, "facial": FACIAL_PROMPT}


def caption_hints(sample: Sample) -> dict:
    attrs = sample.attributes
    return {
        "age": attrs.age if attrs else None,
        "gender": attrs.gender if attrs else None,
        "regions": list(sample.regions),
        "face_count": sample.face_count,
    }


def caption_fields(
    captioner: Captioner, images: list, prompts: dict[str, str], hints: list[dict]
) -> dict[str, list[str]]:
    """field -> one answer per image. A captioner with `caption_many(images, prompts, hints)`
    (one list per prompt) gets every prompt in one call, which an engine like vLLM batches."""
    many = getattr(captioner, "caption_many", None)
    if many is not None:
        answers = many(images, list(prompts.values()), hints)
    else:
        answers = [captioner.caption(images, prompt, hints) for prompt in prompts.values()]
    return dict(zip(prompts, answers, strict=True))


def journal_context(config: BuildConfig, prompts: dict[str, str]) -> str:
    """Digest of what, besides the captioner's name and the sample, decides a caption."""
    settings = {
        "prompts": prompts,
        "max_new_tokens": config.caption.max_new_tokens,
        "engine": config.caption.engine,
        "config_hash": config.output_hash(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class CaptionStage(Stage):
    """Captions every live sample; with `journal_url`, journals them and reuses the journal's."""

    name = "caption"

    def __init__(
        self,
        captioner: Captioner,
        config: BuildConfig | None = None,
        journal_url: str | None = None,
    ) -> None:
        super().__init__()
        self.captioner = captioner
        self.journal = None
        if journal_url is not None:
            if config is None:
                raise ValueError("a journaled caption stage needs the build's config")
            context = journal_context(config, PROMPTS)
            self.journal = Journal(journal_url, captioner.name, context)

    def process(self, samples: list[Sample]) -> None:
        todo = []
        for sample in samples:
            # The stamp ties a caption to the bytes it was made from: a source path may be
            # rewritten with another photo between a crash and the rerun.
            done = self.journal.get(sample.key, sample.sha256) if self.journal else None
            if done is None:
                todo.append(sample)
            else:
                sample.caption, sample.facial = done["caption"], done["facial"]
        if not todo:
            return
        texts = caption_fields(
            self.captioner,
            [s.aligned for s in todo],
            PROMPTS,
            [caption_hints(s) for s in todo],
        )
        for i, sample in enumerate(todo):
            sample.caption, sample.facial = texts["caption"][i], texts["facial"][i]
        if self.journal is not None:
            self.journal.add(
                {s.key: {"caption": s.caption, "facial": s.facial} for s in todo},
                {s.key: s.sha256 for s in todo},
            )
