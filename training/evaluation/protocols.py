"""The one interface an identity-preserving generator implements to be evaluated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

    from training.reference import Reference


@runtime_checkable
class Generator(Protocol):
    """A model that draws `prompt` with the identity of `reference`.

    `name` identifies the model in result tables and output folders (letters, digits, `-`, `_`,
    `.`). `generate` must be deterministic for a given seed, so a resumed evaluation that
    regenerates a missing image gets the image the first run would have made."""

    name: str

    def generate(self, reference: Reference, prompt: str, seed: int) -> Image.Image: ...
