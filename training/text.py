"""`<|facial|>` kept as a token: the text path of ConsistentID's `keep_facial_token` option.

The default text path is the released model's (training/consistentid/prompt.py), which shares
FACIAL_TOKEN, REGION_WORDS and the tokenizer set-up below. This one composes the text like the
reference trainer, with these differences:

- From the facial description (`facial.txt`, the reference's `vqa_llva_more_face_detail`) only
  the clauses (text between `,` `.` `;`) that hold the first mention of a region word are kept;
  the marker goes right after that word, so `two eyes` becomes `two eyes <|facial|>`. Clauses
  keep their order of appearance (the reference reorders them by region; the order carries no
  meaning once each marker knows its region, and the original order reads as written).
- Training text: `Caption: <first sentence of caption> Detail: <marked clauses> <rest of
  caption>`; if that is longer than the 77-token window, `Detail: <marked clauses> Caption:
  <caption>` (the reference's fallback, which moves the region words to the front).
- Inference text: `<prompt> Detail: <marked INFERENCE_FACIAL>`, with the same fallback.

Unlike the reference, which deletes the marker and flags the word before it, the marker stays in
the token sequence as its own special token: `region_token_index[i]` is the position of region
i's `<|facial|>` token, whose embedding the facial encoder replaces. A region gets -1 when its
word is not mentioned, when the region is absent from the image (its marker is dropped, the word
stays), or when its token falls outside the window; truncation keeps the end-of-text token last,
so every index >= 0 points at a `<|facial|>` token and every `<|facial|>` token is indexed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from fgid.schema import REGIONS

FACIAL_TOKEN = "<|facial|>"
REGION_WORDS: tuple[str, ...] = tuple(REGIONS)  # face, eyes, ears, nose, mouth
INFERENCE_FACIAL = "This person has one nose, two eyes, two ears, and a mouth."
MAX_LENGTH = 77

_CLAUSE_END = re.compile(r"[,.;]")
_WORD = re.compile(r"\b(" + "|".join(REGION_WORDS) + r")\b", re.IGNORECASE)
_LAST_WORD = re.compile(r"([A-Za-z]+)\W*$")


def add_facial_token(tokenizer) -> int:
    """Add FACIAL_TOKEN as a special token (once) and return its id.

    The text encoder must then grow to match:
    `text_encoder.resize_token_embeddings(len(tokenizer))`."""
    if _lookup(tokenizer) is None:
        tokenizer.add_tokens([FACIAL_TOKEN], special_tokens=True)
    return facial_token_id(tokenizer)


def facial_token_id(tokenizer) -> int:
    found = _lookup(tokenizer)
    if found is None:
        raise ValueError(f"the tokenizer has no {FACIAL_TOKEN} token: call add_facial_token first")
    return found


def _lookup(tokenizer) -> int | None:
    # An unknown token maps to the unknown id (CLIP: end-of-text), so check the way back;
    # get_vocab() would be exact too but copies the 49k-entry vocabulary on every call.
    found = tokenizer.convert_tokens_to_ids(FACIAL_TOKEN)
    if found is None or tokenizer.convert_ids_to_tokens(found) != FACIAL_TOKEN:
        return None
    return int(found)


def mark_regions(facial: str) -> str:
    """The clauses of `facial` that hold the first mention of a region word, each such word
    followed by FACIAL_TOKEN; "" when no region word occurs."""
    clauses = [c.strip() for c in _CLAUSE_END.split(" ".join(facial.split()))]
    seen: set[str] = set()
    kept = []
    for clause in clauses:
        firsts = []
        for match in _WORD.finditer(clause):
            word = match.group(1).lower()
            if word not in seen:
                seen.add(word)
                firsts.append(match.end())
        if not firsts:
            continue
        for end in reversed(firsts):
            clause = f"{clause[:end]} {FACIAL_TOKEN}{clause[end:]}"
        kept.append(clause)
    return f"{', '.join(kept)}." if kept else ""


def first_sentence(text: str) -> tuple[str, str]:
    """(first sentence up to and including its '.', the rest), both stripped."""
    text = text.strip()
    end = text.find(".")
    if end < 0:
        return text, ""
    return text[: end + 1], text[end + 1 :].strip()


def build_prompt(caption: str, facial: str, tokenizer=None, max_length: int = MAX_LENGTH) -> str:
    """The training text for one sample; with `tokenizer`, the reference's fallback order is
    used when the first composition does not fit in `max_length` tokens."""
    marked = mark_regions(facial)
    caption = " ".join(caption.split())
    if not marked:
        return f"Caption: {caption}" if caption else ""
    if not caption:
        return f"Detail: {marked}"
    first, rest = first_sentence(caption)
    text = " ".join(part for part in (f"Caption: {first} Detail: {marked}", rest) if part)
    if tokenizer is not None and _token_count(tokenizer, text) > max_length:
        text = f"Detail: {marked} Caption: {caption}"
    return text


def build_inference_prompt(
    prompt: str, facial: str = INFERENCE_FACIAL, tokenizer=None, max_length: int = MAX_LENGTH
) -> str:
    """The inference text: the user's prompt followed by the marked fixed description."""
    marked = mark_regions(facial)
    prompt = " ".join(prompt.split())
    if not marked:
        return prompt
    text = f"{prompt} Detail: {marked}" if prompt else f"Detail: {marked}"
    if tokenizer is not None and prompt and _token_count(tokenizer, text) > max_length:
        text = f"Detail: {marked} Caption: {prompt}"
    return text


def tokenize_facial(
    tokenizer,
    text: str,
    present: Sequence[bool] | None = None,
    max_length: int = MAX_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids LongTensor(max_length), region_token_index LongTensor(5)) for `text`.

    Each FACIAL_TOKEN must follow a region word; the first marker of each region is kept when
    `present[region]` (default: all present), later or absent ones are dropped. Over-long text
    is cut to `max_length` tokens ending with end-of-text; markers cut away get -1."""
    if present is not None and len(present) != len(REGION_WORDS):
        raise ValueError(f"present needs {len(REGION_WORDS)} flags, got {len(present)}")
    marker = facial_token_id(tokenizer)
    pieces = text.split(FACIAL_TOKEN)
    ids = [tokenizer.bos_token_id]
    position = [-1] * len(REGION_WORDS)
    for n, piece in enumerate(pieces):
        ids += _encode(tokenizer, piece)
        if n == len(pieces) - 1:
            break
        region = _region_before(piece, text)
        if position[region] < 0 and (present is None or present[region]):
            position[region] = len(ids)
            ids.append(marker)
    if len(ids) + 1 > max_length:
        ids = ids[: max_length - 1]
        position = [p if p < max_length - 1 else -1 for p in position]
    ids.append(tokenizer.eos_token_id)
    ids += [tokenizer.pad_token_id] * (max_length - len(ids))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(position, dtype=torch.long)


def _region_before(piece: str, text: str) -> int:
    match = _LAST_WORD.search(piece)
    word = match.group(1).lower() if match else ""
    if word not in REGION_WORDS:
        raise ValueError(f"{FACIAL_TOKEN} must follow a region word {REGION_WORDS}: {text!r}")
    return REGION_WORDS.index(word)


def _encode(tokenizer, piece: str) -> list[int]:
    return tokenizer(piece, add_special_tokens=False).input_ids if piece.strip() else []


def _token_count(tokenizer, text: str) -> int:
    """Tokens of `text` with its markers (one each) and start/end tokens."""
    pieces = text.split(FACIAL_TOKEN)
    return 2 + (len(pieces) - 1) + sum(len(_encode(tokenizer, p)) for p in pieces)
