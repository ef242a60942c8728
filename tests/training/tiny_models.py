"""Tiny training-side models built offline from real configs, saved in the hub's folder layouts.

The CLIP tokenizer is the real one: its BPE vocabulary ships inside `open_clip`, and CLIP's
vocabulary is a pure function of that file (bytes, bytes + "</w>", the merges, two specials).
Everything else is randomly initialised from small configs of the real architectures, saved so
that production loading code (`from_pretrained(folder, subfolder=...)`) reads it unchanged.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses from the file (its vocab is 49408)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@cache
def _clip_vocab_files() -> tuple[str, str]:
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_json = json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    return vocab_json, merges_txt


def save_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write CLIP's real tokenizer (vocab.json, merges.txt, configs) to `folder`.

    SD 1.5's tokenizer pads with "<|endoftext|>"; SDXL's second tokenizer pads with "!"."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_json, merges_txt = _clip_vocab_files()
    (folder / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token
    )
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)
    return folder


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer, saved to and loaded back from `folder`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(save_clip_tokenizer(folder, pad_token))


# --- Stable Diffusion 1.5 and SDXL folders --------------------------------------------------------

TEXT_WIDTH = 32  # SD 1.5's text width is 768; SDXL's two towers are 768 + 1280
TEXT_WIDTH_2 = 64
IMAGE_SIZE = 32  # the tiny CLIP vision tower's input side (ViT-H/14 takes 224)


def _clip_text_config(width: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def _unet(cross_attention_dim: int, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH_2,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
    else:
        extra = dict(attention_head_dim=8)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    # Two blocks: one downsampling step, so latents are half the image side (SD's VAE: 1/8).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )


def save_clip_image_encoder(folder: Path, projection_dim: int = TEXT_WIDTH) -> Path:
    """A tiny `CLIPVisionModelWithProjection` + `CLIPImageProcessor` (the image_encoder and
    feature_extractor of an IP-Adapter-style pipeline)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=3,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=projection_dim,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(folder / "feature_extractor")
    return folder


def build_tiny_sd15(folder: Path, seed: int = 0) -> Path:
    """A Stable Diffusion 1.5 pipeline folder (model_index.json, unet, vae, text_encoder,
    tokenizer, scheduler, image_encoder, feature_extractor), all tiny. Returns the folder."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    save_clip_image_encoder(folder)
    tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(folder / "tokenizer"))
    image_encoder, feature_extractor = _image_encoder(folder)
    StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(TEXT_WIDTH)),
        tokenizer=tokenizer,
        unet=_unet(TEXT_WIDTH),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def _image_encoder(folder: Path):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    return (
        CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder"),
        CLIPImageProcessor.from_pretrained(folder / "feature_extractor"),
    )


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """An SDXL pipeline folder: unet (text_time conditioning), vae, text_encoder (CLIP-L
    shaped), text_encoder_2 (bigG shaped, with projection), tokenizer, tokenizer_2, scheduler."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(TEXT_WIDTH)),
        text_encoder_2=CLIPTextModelWithProjection(
            _clip_text_config(TEXT_WIDTH_2, projection_dim=TEXT_WIDTH_2)
        ),
        tokenizer=CLIPTokenizer.from_pretrained(save_clip_tokenizer(folder / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(
            save_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
        ),
        unet=_unet(TEXT_WIDTH + TEXT_WIDTH_2, sdxl=True),
        scheduler=_scheduler(),
    ).save_pretrained(folder)
    return folder


# --- evaluation backbones -------------------------------------------------------------------------


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny `CLIPModel` + `CLIPProcessor` (CLIP-T / CLIP-I)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    folder = Path(folder)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    config = CLIPConfig(
        text_config=_clip_text_config(TEXT_WIDTH).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer = clip_tokenizer(folder / "_tokenizer")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


def build_tiny_dino(folder: Path, seed: int = 0) -> Path:
    """A tiny ViT (DINO ViT-S/16's architecture family: `ViTModel`, CLS token) + processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(folder)
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder
