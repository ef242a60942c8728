"""The released model's text path on the real CLIP tokenizer. The expected strings and positions
were derived from the reference code's functions on the same inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from training.consistentid import prompt
from training.text import FACIAL_TOKEN, add_facial_token

F = FACIAL_TOKEN
ALL = [True] * 5
FACIAL = (
    "The face is oval, the eyes are brown, the ears are small, the nose is straight, "
    "and the mouth is wide."
)
CAPTION = (
    "A man smiling at the camera. He wears a red hat and sits in a park with trees behind him."
)


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    add_facial_token(tok)
    return tok


def test_detail_clauses_in_the_reference_order_with_its_quirks():
    detail, kept = prompt.detail_text(FACIAL, ALL)
    assert detail == (
        f"The face {F} is oval, the ears {F} are small, the eyes {F} are brown, "
        f"the nose {F} is straight, and the mouth {F} is wide,"
    )
    assert kept == ALL
    # Repeats go, words are re-joined around marks, an absent region keeps its word unmarked,
    # a capitalised first mention is not marked and its region is dropped.
    detail, kept = prompt.detail_text(
        "Face: square; the person's eyes are deep, eyes blue. The nose is crooked",
        [True, True, True, False, True],
    )
    assert detail == f"the person s eyes {F} are deep,"
    assert kept == [False, True, False, False, False]
    # Two regions in one clause: the clause goes once, holding both markers.
    detail, kept = prompt.detail_text("The eyes and the nose are large and the face is round", ALL)
    assert detail == f"The eyes {F} and the nose {F} are large and the face {F} is round,"
    assert kept == [True, True, False, True, False]


def test_training_text_and_tokens(tokenizer):
    text, ids, index = prompt.encode_training(tokenizer, CAPTION, FACIAL, ALL)
    assert text == (
        f"Caption:A man smiling at the camera. Detail:The face {F} is oval, the ears {F} are "
        f"small, the eyes {F} are brown, the nose {F} is straight, and the mouth {F} is wide, "
        "He wears a red hat and sits in a park with trees behind him"
    )
    assert ids.shape == (77,) and FACIAL_TOKEN not in tokenizer.decode(ids)
    words = tokenizer.convert_ids_to_tokens(ids.tolist())
    # The k-th marked word takes the k-th kept region (face, eyes, ears, nose, mouth): "ears"
    # carries the eyes' feature and "eyes" the ears', as the released weights learnt.
    assert index.tolist() == [13, 18, 23, 28, 34]
    assert [words[i] for i in index] == [
        "face</w>",
        "ears</w>",
        "eyes</w>",
        "nose</w>",
        "mouth</w>",
    ]
    assert ids[53] == tokenizer.eos_token_id == tokenizer.pad_token_id


def test_long_text_swaps_and_long_detail_falls_back_to_the_caption(tokenizer):
    long_caption = "A very long caption. " + "words and more words " * 20
    text, ids, index = prompt.encode_training(tokenizer, long_caption, FACIAL, ALL)
    assert text.startswith(f"Detail:The face {F} is oval,") and text.endswith(long_caption)
    assert ids[-1] != tokenizer.eos_token_id  # cut at 77 with no end token, as the reference
    assert (index >= 0).all()
    long_facial = "the face is round and " + "very " * 70 + "wide, eyes blue."
    detail, _ = prompt.detail_text(long_facial, ALL)
    assert len(detail) > prompt.MAX_DETAIL_CHARS
    text, _, index = prompt.encode_training(tokenizer, CAPTION, long_facial, ALL)
    assert text == CAPTION and (index == -1).all()


def test_markers_cut_away_leave_the_last_regions_unfused(tokenizer):
    text = "Detail:" + " ".join(["word"] * 70) + f" the nose {F} and the mouth {F} are big"
    ids, index = prompt.tokenize(tokenizer, text, [False, False, False, True, True])
    assert index.tolist() == [-1, -1, -1, 74, -1]  # start, "detail", ":", 70 words, "the"


def test_inference_text(tokenizer):
    text, kept = prompt.inference_prompt(tokenizer, "A man, in a forest")
    assert text == (
        f"A man, in a forestDetail:The person has one face {F}, two ears {F}, two eyes {F}, "
        f"one nose {F}, and one mouth {F},"
    )
    assert kept == ALL
    long_prompt = "cinematic photo," + "a person " * 30
    text, _ = prompt.inference_prompt(tokenizer, long_prompt)
    assert text.startswith("Detail:The person has") and text.endswith(" Caption:" + long_prompt)
    text, _ = prompt.inference_prompt(tokenizer, "a man", facial="the face. " * 40)
    assert text == "a man"
    plain = prompt.plain_ids(tokenizer, f"a nose {F} here")
    assert torch.equal(plain, prompt.plain_ids(tokenizer, "a nose here"))


def test_a_marker_in_the_caption_is_not_a_region(tokenizer):
    text, _, index = prompt.encode_training(tokenizer, f"A face {F} here.", "Brown hair.", ALL)
    assert F not in text and (index == -1).all()
