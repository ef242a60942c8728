"""Two captions per image with the spec's prompts, stored raw."""

from __future__ import annotations

from fgid.protocols import Captioner
from fgid.sample import Sample
from fgid.schema import CAPTION_PROMPT, FACIAL_PROMPT
from fgid.stages.base import Stage


def caption_hints(sample: Sample) -> dict:
    attrs = sample.attributes
    return {
        "age": attrs.age if attrs else None,
        "gender": attrs.gender if attrs else None,
        "regions": list(sample.regions),
        "face_count": sample.face_count,
    }


class CaptionStage(Stage):
    name = "caption"

    def __init__(self, captioner: Captioner) -> None:
        super().__init__()
        self.captioner = captioner

    def process(self, samples: list[Sample]) -> None:
        images = [s.aligned for s in samples]
        hints = [caption_hints(s) for s in samples]
        captions = self.captioner.caption(images, CAPTION_PROMPT, hints)
        facials = self.captioner.caption(images, FACIAL_PROMPT, hints)
        for sample, caption, facial in zip(samples, captions, facials, strict=True):
            sample.caption, sample.facial = caption, facial
