"""The released ConsistentID's text path: region clauses, prompt layouts, marker-free tokens.

The reference code (JackAILab/ConsistentID) composes its text this way, and the released weights
were trained on it, so it is the default here, quirks included:

- The facial description loses every repeat of a region word (case-insensitive) and is re-joined
  from its words and `.,;!?` marks with single spaces ("brown eyes." -> "brown eyes ."; other
  characters such as apostrophes are dropped).
- Each region present in the image gets `<|facial|>` after the first lowercase mention of its
  word. A present region whose word is missing is dropped from the regions.
- The clause (text between `,` `.` `;`) of each marker is cut out, in the order face, ears, eyes,
  nose, mouth, each followed by ","; the clauses are joined by spaces: the detail text. (A marker
  whose clause already went with an earlier one is searched for in vain; on short remaining text
  that search takes its last character as a clause, as the reference's does.)
- Training: `Caption:<first sentence> Detail:<detail><rest of caption minus its last character>`;
  over 77 tokens (markers counted) `Detail:<detail> Caption:<caption>`; a detail text over 340
  characters gives the caption alone. Inference: `<prompt>Detail:<detail>`, the same swap, and the
  prompt alone when the raw description passes 330 characters.
- Tokens: the text is tokenised with the markers, the markers are removed, and the token before
  each (the region word's last token) is where the region's feature goes. The ids are cut at 77
  (no end token then) or padded. The k-th such position, in text order, takes the k-th region
  kept, in the order face, eyes, ears, nose, mouth; a position cut away leaves the last regions
  unfused. (So when ears and eyes sit in separate clauses, the word "ears" receives the eyes'
  feature and "eyes" the ears': the released weights learnt that pairing.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from training.text import FACIAL_TOKEN, MAX_LENGTH, REGION_WORDS, facial_token_id

# The reference pipeline's built-in description (its LLaVA step is optional and off).
INFERENCE_FACIAL = "The person has one face, one nose, two eyes, two ears, and one mouth."
MAX_DETAIL_CHARS = 340  # training: longer detail texts fall back to the caption alone
MAX_INFERENCE_FACIAL_CHARS = 330  # inference: measured on the raw description
# The reference walks its parsing classes in this order (Face, Ears, Eyes, Nose, Lips).
CLAUSE_ORDER = ("face", "ears", "eyes", "nose", "mouth")
_STOPS = ",.;"
_WORDS = re.compile(r"\b\w+\b|[.,;!?]")


def _without_repeats(text: str) -> str:
    words = _WORDS.findall(text)
    seen: set[str] = set()
    for i, word in enumerate(words):
        key = word.lower()
        if key in REGION_WORDS:
            if key in seen:
                words[i] = ""
            seen.add(key)
    return " ".join(words)


def detail_text(facial: str, present: Sequence[bool]) -> tuple[str, list[bool]]:
    """(detail text with `<|facial|>` after each kept region word, kept flags per region)."""
    if len(present) != len(REGION_WORDS):
        raise ValueError(f"present needs {len(REGION_WORDS)} flags, got {len(present)}")
    text = _without_repeats(facial)
    wanted = [w for w in CLAUSE_ORDER if present[REGION_WORDS.index(w)]]
    kept: set[str] = set()
    for word in reversed(wanted):
        marked = re.sub(rf"\b{word}\b", f"{word} <|{word}|>", text, count=1)
        if marked != text:
            kept.add(word)
        text = marked
    clauses = []
    for word in wanted:
        marker = f"<|{word}|>"
        start = text.find(marker)  # -1 once an earlier clause took it: see the module docstring
        end = start + len(marker)
        while start > 0 and text[start - 1] not in _STOPS:
            start -= 1
        while end < len(text) and text[end] not in _STOPS:
            end += 1
        clause = text[start:end].strip()
        if clause:
            clauses.append(clause + ",")
            text = text[:start] + text[end:]
    detail = " ".join(clauses)
    for word in CLAUSE_ORDER:
        detail = detail.replace(f"<|{word}|>", FACIAL_TOKEN)
    return detail, [word in kept for word in REGION_WORDS]


def first_sentence(text: str) -> str:
    end = text.find(".")
    return (text[: end + 1] if end >= 0 else text).strip()


def token_count(tokenizer, text: str) -> int:
    """Tokens of `text` with start and end, each marker counting one (the tokenizer knows it)."""
    return len(tokenizer(text, verbose=False).input_ids)


def training_prompt(tokenizer, caption: str, detail: str, max_length: int = MAX_LENGTH) -> str:
    caption = caption.replace(FACIAL_TOKEN, "")  # a marker comes from the detail text only
    first = first_sentence(caption)
    text = f"Caption:{first} Detail:{detail}{caption[len(first) : -1]}"
    if token_count(tokenizer, text) > max_length:
        text = f"Detail:{detail} Caption:{caption}"
    if len(detail) > MAX_DETAIL_CHARS:
        text = caption
    return text


def inference_prompt(
    tokenizer,
    prompt: str,
    facial: str = INFERENCE_FACIAL,
    present: Sequence[bool] = (True,) * 5,
    max_length: int = MAX_LENGTH,
    separator: str = "",
) -> tuple[str, list[bool]]:
    """(text, kept flags) for a user prompt and a description of the reference face.
    `separator` goes before `Detail:` (the reference's SDXL pipeline writes "; ")."""
    detail, kept = detail_text(facial, present)
    prompt = prompt.replace(FACIAL_TOKEN, "")
    text = f"{prompt}{separator}Detail:{detail}"
    if token_count(tokenizer, text) > max_length:
        text = f"{separator}Detail:{detail} Caption:{prompt}"
    if len(facial) > MAX_INFERENCE_FACIAL_CHARS:
        text = prompt
    return text, kept


def tokenize(
    tokenizer, text: str, kept: Sequence[bool], max_length: int = MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids LongTensor(max_length) without markers, region_token_index LongTensor(5)):
    region i's feature replaces the hidden state at index[i]; -1 where it is not fused."""
    marker = facial_token_id(tokenizer)
    ids: list[int] = []
    positions: list[int] = []
    for token in tokenizer(text, verbose=False).input_ids:
        if token == marker:
            positions.append(len(ids) - 1)
        else:
            ids.append(token)
    ids = ids[:max_length] + [tokenizer.pad_token_id] * (max_length - len(ids))
    positions = [p for p in positions if p < max_length]
    regions = [i for i, keep in enumerate(kept) if keep]
    if len(positions) > len(regions):
        raise ValueError(f"{len(positions)} markers for {len(regions)} kept regions: {text!r}")
    index = [-1] * len(REGION_WORDS)
    for region, position in zip(regions, positions, strict=False):
        index[region] = position
    return torch.tensor(ids, dtype=torch.long), torch.tensor(index, dtype=torch.long)


def plain_ids(tokenizer, text: str, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """The text without markers, tokenised as the pipeline's text-only branch does (cut with
    the end token kept)."""
    return tokenizer(
        text.replace(FACIAL_TOKEN, ""),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids[0]


def spelled_ids(tokenizer, text: str, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """`text` through a tokenizer that has no `<|facial|>` (SDXL's second: the markers become
    plain tokens), cut at `max_length` (no end token then) or padded, as the released SDXL
    pipeline reads its text."""
    ids = tokenizer(text, verbose=False).input_ids[:max_length]
    return torch.tensor(ids + [tokenizer.pad_token_id] * (max_length - len(ids)))


def encode_training(
    tokenizer, caption: str, facial: str, present: Sequence[bool], max_length: int = MAX_LENGTH
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(text, input_ids, region_token_index) of one training sample."""
    detail, kept = detail_text(facial, present)
    text = training_prompt(tokenizer, caption, detail, max_length)
    ids, index = tokenize(tokenizer, text, kept, max_length)
    return text, ids, index
