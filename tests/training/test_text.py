"""The `<|facial|>` text scheme on the real CLIP tokenizer: marking, positions, 77-token rules."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from training.stream import webdataset
from training.text import (
    FACIAL_TOKEN,
    INFERENCE_FACIAL,
    REGION_WORDS,
    add_facial_token,
    build_inference_prompt,
    build_prompt,
    facial_token_id,
    mark_regions,
    tokenize_facial,
)

FACE, EYES, EARS, NOSE, MOUTH = range(5)


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    add_facial_token(tok)
    return tok


def tokens(tokenizer, ids: torch.Tensor) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids.tolist())


def assert_consistent(tokenizer, ids: torch.Tensor, index: torch.Tensor) -> None:
    """Every index >= 0 points at a facial token right after its region word, and every
    facial token in the sequence is indexed."""
    facial = facial_token_id(tokenizer)
    assert ids.shape == (77,) and ids.dtype == torch.long
    assert index.shape == (5,) and index.dtype == torch.long
    words = tokens(tokenizer, ids)
    for region, position in enumerate(index.tolist()):
        if position >= 0:
            assert ids[position] == facial
            assert words[position - 1] == f"{REGION_WORDS[region]}</w>"
    assert (
        sorted(p for p in index.tolist() if p >= 0) == (ids == facial).nonzero().flatten().tolist()
    )
    ends = (ids == tokenizer.eos_token_id).nonzero().flatten()
    assert ids[0] == tokenizer.bos_token_id and len(ends) >= 1


def test_add_facial_token_is_idempotent(clip_tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    size = len(tok)
    with pytest.raises(ValueError, match="add_facial_token"):
        tokenize_facial(tok, f"a face {FACIAL_TOKEN}")
    first = add_facial_token(tok)
    assert add_facial_token(tok) == first == size
    assert len(tok) == size + 1
    # One token, not split into BPE pieces.
    assert tok(f"a face {FACIAL_TOKEN} here").input_ids.count(first) == 1


def test_only_first_mention_of_each_region_is_marked():
    facial = (
        "Her face is oval and her face is smooth. Her eyes are blue; the eyes sparkle, "
        "she has full lips. A small nose and a wide mouth. The Ears are hidden, "
        "the nose is straight."
    )
    f = FACIAL_TOKEN
    assert mark_regions(facial) == (
        f"Her face {f} is oval and her face is smooth, Her eyes {f} are blue, "
        f"A small nose {f} and a wide mouth {f}, The Ears {f} are hidden."
    )
    marked = mark_regions(facial)
    assert marked.count(FACIAL_TOKEN) == 5
    assert mark_regions("Brown hair and a beard.") == ""
    # Nothing to mark: the caption alone; no caption: the detail alone.
    assert build_prompt("A man. He smiles.", "Brown hair.") == "Caption: A man. He smiles."
    assert build_prompt("", "Blue eyes.") == f"Detail: Blue eyes {FACIAL_TOKEN}."


def test_positions_point_at_the_facial_token(tokenizer):
    caption = "A woman in her thirties smiles at the camera. She wears a red scarf."
    facial = "She has an oval face, green eyes, small ears, a straight nose and a wide mouth."
    text = build_prompt(caption, facial)
    assert text.startswith("Caption: A woman in her thirties smiles at the camera. Detail: ")
    assert text.endswith("She wears a red scarf.")
    ids, index = tokenize_facial(tokenizer, text)
    assert (index >= 0).all()
    assert_consistent(tokenizer, ids, index)
    # Region order in the text is face, eyes, ears, nose, mouth here, so positions increase.
    assert index.tolist() == sorted(index.tolist())
    # The text outside the markers tokenises exactly as it does without them.
    plain = tokenizer(text.replace(f" {FACIAL_TOKEN}", ""), padding="max_length", max_length=77)
    assert [t for t in ids.tolist() if t != facial_token_id(tokenizer)] == plain.input_ids[:72]


def test_absent_regions_lose_their_token_but_keep_their_word(tokenizer):
    text = build_prompt("A man.", "He has a round face, blue eyes, big ears, a nose and a mouth.")
    present = [True, False, True, True, False]
    ids, index = tokenize_facial(tokenizer, text, present)
    assert index[EYES] == -1 and index[MOUTH] == -1
    assert (index[[FACE, EARS, NOSE]] >= 0).all()
    assert_consistent(tokenizer, ids, index)
    words = tokens(tokenizer, ids)
    assert "eyes</w>" in words and "mouth</w>" in words
    assert (ids == facial_token_id(tokenizer)).sum() == 3


def test_unmentioned_region_gets_no_token(tokenizer):
    ids, index = tokenize_facial(tokenizer, build_prompt("A girl.", "Her eyes are brown."))
    assert index.tolist()[EYES] >= 0
    assert [i for r, i in enumerate(index.tolist()) if r != EYES] == [-1] * 4
    assert_consistent(tokenizer, ids, index)


def test_inference_description_gives_nose_eyes_ears_and_mouth_tokens(tokenizer):
    text = build_inference_prompt("a photo of a woman in a garden", tokenizer=tokenizer)
    assert text == (
        f"a photo of a woman in a garden Detail: This person has one nose {FACIAL_TOKEN}, "
        f"two eyes {FACIAL_TOKEN}, two ears {FACIAL_TOKEN}, and a mouth {FACIAL_TOKEN}."
    )
    ids, index = tokenize_facial(tokenizer, text)
    assert_consistent(tokenizer, ids, index)
    # "face" does not occur in the fixed description: four region tokens, in text order.
    assert index[FACE] == -1
    assert index[NOSE] < index[EYES] < index[EARS] < index[MOUTH]
    assert INFERENCE_FACIAL in text.replace(f" {FACIAL_TOKEN}", "")


def test_long_text_moves_the_detail_first(tokenizer):
    caption = "A man stands on a beach at sunset. " + "He wears a blue jacket and jeans. " * 8
    facial = "He has a square face, dark eyes, a broad nose and a thin mouth."
    short = build_prompt(caption, facial)  # no tokenizer: the first composition
    assert short.startswith("Caption:")
    text = build_prompt(caption, facial, tokenizer)
    assert text.startswith(f"Detail: He has a square face {FACIAL_TOKEN}")
    ids, index = tokenize_facial(tokenizer, text)
    assert_consistent(tokenizer, ids, index)
    assert (index[[FACE, EYES, NOSE, MOUTH]] >= 0).all() and index[EARS] == -1
    # Cut, not padded: text up to position 75, then end-of-text.
    assert ids[75] != tokenizer.eos_token_id and ids[76] == tokenizer.eos_token_id


def test_token_past_the_window_is_dropped_never_half_kept(tokenizer):
    """Find the filler length that puts the nose token exactly on position 76, where the
    end-of-text token must go, and one past it: both lose the token, the word may stay."""
    facial_id = facial_token_id(tokenizer)
    for filler in range(40, 90):
        text = f"Detail: a face {FACIAL_TOKEN} " + "very " * filler + f"long nose {FACIAL_TOKEN}."
        _, untruncated = tokenize_facial(tokenizer, text, max_length=200)
        if untruncated[NOSE] == 76:
            break
    else:
        pytest.fail("no filler length put the nose token on position 76")
    ids, index = tokenize_facial(tokenizer, text)
    assert index[NOSE] == -1 and index[FACE] >= 0
    assert ids[75] == tokenizer.convert_tokens_to_ids("nose</w>")
    assert ids[76] == tokenizer.eos_token_id
    assert (ids == facial_id).sum() == 1
    assert_consistent(tokenizer, ids, index)
    # One token earlier, it fits: position 75, end-of-text after it.
    ids, index = tokenize_facial(tokenizer, text.replace("very ", "", 1))
    assert index[NOSE] == 75 and ids[76] == tokenizer.eos_token_id
    assert_consistent(tokenizer, ids, index)


def test_marker_must_follow_a_region_word(tokenizer):
    with pytest.raises(ValueError, match="region word"):
        tokenize_facial(tokenizer, f"a man {FACIAL_TOKEN} smiling")
    with pytest.raises(ValueError, match="5 flags"):
        tokenize_facial(tokenizer, "a face", present=[True, True])


def test_dataset_captions_tokenise_consistently(tokenizer, built_dataset):
    """The captions a real build wrote, through the training composition."""
    seen = 0
    for sample in webdataset(str(built_dataset)):
        caption = sample["caption.txt"].decode()
        facial = sample["facial.txt"].decode()
        text = build_prompt(caption, facial, tokenizer)
        ids, index = tokenize_facial(tokenizer, text)
        assert_consistent(tokenizer, ids, index)
        for region, word in enumerate(REGION_WORDS):
            mentioned = f" {word}" in facial.lower()
            assert (index[region] >= 0) == mentioned
        seen += 1
    assert seen == 11
