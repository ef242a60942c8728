"""A LLaVA-1.5-7B-sized captioner with random weights, and how fast it captions.

The model is transformers' LlavaForConditionalGeneration from a LlavaConfig with Llama-2-7B text
dimensions (4096 wide, 32 layers, 11008 MLP, 32 heads, vocabulary 32064) and CLIP ViT-L/14-336
vision dimensions (1024 wide, 24 layers, 576 image tokens), built straight on the device in
bf16. The tokenizer is word-level (the real one is not available offline): a prompt comes out
at about as many tokens as Llama's tokenizer gives. Generation follows fgid's LlavaCaptioner:
the llava-hf prompt template, left padding, greedy, one beam, one call per prompt per batch;
every caption is forced to `tokens` new tokens (random weights never stop on their own, real
captions run to roughly 60-150 tokens), so the figure is for that caption length.
"""

from __future__ import annotations

import re
import time

import numpy as np

from fgid.backends.full.llava import llava_prompt
from fgid.schema import CAPTION_PROMPT, FACIAL_PROMPT

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
SIZES = {
    "7b": {
        "text": dict(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        "vision": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
    },
    "tiny": {
        "text": dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=30,
            patch_size=6,
            projection_dim=32,
        ),
    },
}


def word_tokenizer(vocab_size: int):
    """Words and punctuation of the prompts as tokens, padded with fillers to `vocab_size`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join(llava_prompt(p) for p in (CAPTION_PROMPT, FACIAL_PROMPT))
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_llava(size: str, device: str):
    """(model, processor): random weights, bf16 on CUDA (float32 on the CPU), eval mode."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    dims = SIZES[size]
    tokenizer = word_tokenizer(dims["text"]["vocab_size"])
    vision = CLIPVisionConfig(**dims["vision"])
    text = LlamaConfig(
        **dims["text"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    side, patch = vision.image_size, vision.patch_size
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(side // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no float32 copy of 7B weights
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def caption_speed(model, processor, crops: list[np.ndarray], batch: int, tokens: int) -> dict:
    """Caption every crop with both prompts; seconds, images/s and generated tokens/s."""
    import torch
    from PIL import Image

    device, dtype = model.device, model.dtype
    tokenizer = processor.tokenizer
    images = [Image.fromarray(c) for c in crops]
    started = time.perf_counter()
    generated = 0
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        for prompt in (CAPTION_PROMPT, FACIAL_PROMPT):
            text = [llava_prompt(prompt)] * len(chunk)
            inputs = processor(images=chunk, text=text, padding=True, return_tensors="pt")
            inputs = inputs.to(device, dtype=dtype)
            with torch.inference_mode():
                out = model.generate(
                    **inputs,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
            generated += (out.shape[1] - inputs["input_ids"].shape[1]) * len(chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "images": len(images),
        "seconds": seconds,
        "images_per_s": len(images) / seconds,
        "new_tokens_per_caption": tokens,
        "tokens_per_s": generated / seconds,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
    }


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
