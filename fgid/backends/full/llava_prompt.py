"""The LLaVA-1.5 prompt text, shared by both engines (transformers and vLLM)."""

from __future__ import annotations


def llava_prompt(question: str) -> str:
    """The text sent with one image: the llava-hf LLaVA-1.5 chat template rendered for a user turn
    holding the image then `question`, followed by the generation prompt."""
    return f"USER: <image>\n{question} ASSISTANT:"
