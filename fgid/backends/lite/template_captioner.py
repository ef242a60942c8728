"""Captions filled in from what the other stages measured, marked as coming from a template.

It stands in for LLaVA where no VLM can run; a caption that claims to describe what it did not
see would poison a training set, so every caption says where it came from.
"""

from __future__ import annotations

import numpy as np

from fgid.schema import CAPTION_PROMPT, FACIAL_PROMPT

MARK = "[template caption, not a VLM]"

_REGION_PHRASES = {
    "face": "a face",
    "eyes": "two eyes",
    "ears": "two ears",
    "nose": "one nose",
    "mouth": "a mouth",
}


def person_noun(gender: str | None, age: float | None) -> str:
    if gender not in ("male", "female"):
        return "person"
    if age is not None and age < 18:
        return "boy" if gender == "male" else "girl"
    return "man" if gender == "male" else "woman"


class TemplateCaptioner:
    name = "fgid-template-captioner-v1"

    def caption(self, images: list[np.ndarray], prompt: str, hints: list[dict]) -> list[str]:
        if prompt == CAPTION_PROMPT:
            return [self._describe(h) for h in hints]
        if prompt == FACIAL_PROMPT:
            return [self._facial(h) for h in hints]
        raise ValueError("the template captioner only answers the two FGID prompts")

    @staticmethod
    def _describe(hint: dict) -> str:
        noun = person_noun(hint.get("gender"), hint.get("age"))
        age = hint.get("age")
        age_text = f", about {round(age)} years old" if age is not None else ""
        others = (hint.get("face_count") or 1) - 1
        crowd = f" {others} other face{'s' if others > 1 else ''} in the photo." if others else ""
        return f"{MARK} A photo of a {noun}{age_text}.{crowd}"

    @staticmethod
    def _facial(hint: dict) -> str:
        seen = [_REGION_PHRASES[r] for r in _REGION_PHRASES if r in hint.get("regions", [])]
        if not seen:
            return f"{MARK} No facial features were located."
        listed = ", ".join(seen[:-1]) + (" and " if len(seen) > 1 else "") + seen[-1]
        return f"{MARK} This person has {listed} visible."
