"""Benchmark ConsistentID training: samples/s and data-loader wait as a fraction of step time.

Runs the real trainer (training.consistentid.train.train_consistentid: the loader, the shared loop,
the model) on a lite-built dataset, with a base-model folder of random weights written here from
configs (no download):
- `--device cpu` (default size `tiny`): the test suite's tiny shapes, 64 px; runs on a laptop.
- `--device cuda` (default size `sd15`): real sizes: the SD1.5 UNet, VAE and CLIP ViT-L text
  encoder, the CLIP ViT-H/14 vision tower, 512 px, bf16, the spec's model options.

Figures are steady state: the first `--warmup` steps (allocation, kernel selection) are left
out, using the loop's per-step metrics.jsonl. References: the paper's ~0.76 samples/s per RTX
3090; the target on one H100 is >= 8 samples/s with loader wait < 5%.

The dataset is built here with the lite model set (dlib etc.) unless `--dataset` names one; a
machine without those models takes a dataset built elsewhere (e.g. `--keep` it and copy it).

Run:  uv run python bench/train_bench.py --device cpu
      python bench/train_bench.py --device cuda --dataset DIR [--batch-size 16] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from bench.diagnose import dump_stacks_on_term

PAPER_SAMPLES_PER_S = 0.76  # per RTX 3090 (8 GPUs, batch 16, ~15 epochs of 524k in ~15 days)
H100_TARGET_SAMPLES_PER_S = 8.0
LOADER_WAIT_TARGET = 0.05

# Real sizes, from the public configs of SD1.5 (unet/, vae/, text_encoder/, scheduler/) and of
# CLIP ViT-H/14 (laion2B), with random weights.
SD15 = {
    "unet": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    "text": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    "vision": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=16,
        num_hidden_layers=32,
        image_size=224,
        patch_size=14,
        projection_dim=1024,
        hidden_act="gelu",
    ),
}

TINY = {
    "unet": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ),
    "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2),
    "vision": dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=3,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    ),
}

SIZES = {
    "sd15": (SD15, {}, 512),
    "tiny": (TINY, dict(lora_rank=4, id_depth=1, facial_depth=1, dim_head=16), 64),
}

log = logging.getLogger("train_bench")


def write_base_model(folder: Path, shapes: dict, dtype) -> Path:
    """A Stable Diffusion folder (unet, vae, text_encoder, tokenizer, scheduler, image_encoder,
    feature_extractor) with random weights; the tokenizer is CLIP's real BPE vocabulary."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from tests.training.tiny_models import save_clip_tokenizer

    torch.manual_seed(0)
    text = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **shapes["text"],
    )
    vision = CLIPVisionConfig(**shapes["vision"])
    parts = {
        "unet": UNet2DConditionModel(**shapes["unet"]),
        "vae": AutoencoderKL(**shapes["vae"]),
        "text_encoder": CLIPTextModel(text),
        "image_encoder": CLIPVisionModelWithProjection(vision),
    }
    for name, model in parts.items():
        if dtype != torch.float32:
            model.to(dtype)
        model.save_pretrained(folder / name)
    save_clip_tokenizer(folder / "tokenizer")
    side = vision.image_size
    CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(folder / "feature_extractor")
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    # The index a saved pipeline has: training checks for it before loading anything.
    index = {name: [type(model).__module__.split(".")[0], type(model).__name__]
             for name, model in parts.items()}  # fmt: skip
    index.update(
        _class_name="StableDiffusionPipeline",
        _diffusers_version=diffusers.__version__,
        scheduler=["diffusers", "DDPMScheduler"],
        tokenizer=["transformers", "CLIPTokenizer"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        safety_checker=[None, None],
        requires_safety_checker=False,
    )
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_dataset(work: Path, images: int) -> Path:
    """A lite build (dlib models, CPU) of demo-photo variants: identities of several images."""
    from bench.build_bench import make_inputs
    from fgid.config import BuildConfig
    from fgid.models import load_model_set
    from fgid.pipeline import build

    config = BuildConfig(models={"set": "lite"}, shard_size=16)
    out = work / "dataset"
    build([make_inputs(work, images)], str(out), config, load_model_set(config))
    return out


def steady_figures(metrics: Path, warmup: int, batch_size: int) -> dict:
    """Samples/s and loader-wait fraction over the steps after `warmup`, from the loop's
    cumulative per-step rows (samples/s and wait fraction since the run started)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    elapsed = [r["step"] * batch_size / r["samples_per_second"] for r in rows]
    waited = [r["loader_wait_fraction"] * e for r, e in zip(rows, elapsed, strict=True)]
    first = min(warmup, len(rows) - 1) - 1  # the row that ends the warm-up (-1: none)
    t0, w0, s0 = (elapsed[first], waited[first], rows[first]["step"]) if first >= 0 else (0, 0, 0)
    seconds = elapsed[-1] - t0
    return {
        "measured_steps": rows[-1]["step"] - s0,
        "seconds": seconds,
        "samples_per_s": (rows[-1]["step"] - s0) * batch_size / seconds,
        "loader_wait_fraction": (waited[-1] - w0) / seconds,
        "final_loss": rows[-1]["loss"],
    }


def run(args, work: Path) -> dict:
    import torch

    from training.consistentid.train import ConsistentIDTrainConfig, train_consistentid
    from training.preflight import dataset_summary

    shapes, options, resolution = SIZES[args.size]
    resolution = args.resolution or resolution
    dataset = Path(args.dataset) if args.dataset else build_dataset(work, args.images)
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    base = write_base_model(work / f"base-{args.size}", shapes, dtype)
    # Training refuses a non-512-d (lite) build unless id_dim says so on purpose: the bench
    # times whatever build it is given, and the ID projection's width barely moves a step.
    id_dim = int(dataset_summary(str(dataset))["embedding_dim"])
    config = ConsistentIDTrainConfig(
        dataset_url=str(dataset),
        base_model=str(base),
        id_dim=id_dim,
        model=options,
        loader={
            "batch_size": args.batch_size,
            "resolution": resolution,
            "workers": args.workers,
            "start_method": args.start_method,
            "shuffle_buffer": 64,
        },
        train={
            "output_dir": str(work / "run"),
            "max_steps": args.warmup + args.steps,
            "mixed_precision": args.mixed_precision,
            "checkpoint_every": 10**9,
            "checkpoints_limit": 1,
            "resume_from": None,
            "log_every": 1,
        },
    )
    result = train_consistentid(config)
    figures = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "size": args.size,
        "resolution": resolution,
        "id_dim": id_dim,
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "workers": args.workers,
        "start_method": args.start_method,
        "torch_threads": torch.get_num_threads(),
        "whole_run_samples_per_s": result.samples_per_second,
        **steady_figures(work / "run" / "metrics.jsonl", args.warmup, args.batch_size),
    }
    figures["ratio_to_paper_3090"] = figures["samples_per_s"] / PAPER_SAMPLES_PER_S
    figures["ratio_to_h100_target"] = figures["samples_per_s"] / H100_TARGET_SAMPLES_PER_S
    figures["loader_wait_ratio_to_target"] = figures["loader_wait_fraction"] / LOADER_WAIT_TARGET
    return figures


def report(figures: dict) -> None:
    notes = {
        "ratio_to_paper_3090": f"paper: {PAPER_SAMPLES_PER_S} samples/s per RTX 3090",
        "ratio_to_h100_target": f"target on one H100: >= {H100_TARGET_SAMPLES_PER_S} samples/s",
        "loader_wait_ratio_to_target": f"target: loader wait < {LOADER_WAIT_TARGET:.0%}",
    }
    print(f"\n== ConsistentID training bench ({figures['size']}, {figures['device']}) ==")
    if figures["size"] != "sd15":
        print("(tiny models: the ratios below are not comparable with real-size throughput)")
    for name, value in figures.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{name:30s} {text}" + (f"  ({notes[name]})" if name in notes else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: tiny on cpu, sd15 on cuda")
    parser.add_argument("--dataset", help="a built dataset (default: a lite build made here)")
    parser.add_argument("--images", type=int, default=24, help="inputs of the lite build")
    parser.add_argument("--batch-size", type=int, help="default: 4 on cpu, 16 on cuda")
    parser.add_argument("--resolution", type=int, help="default: the size's (64 tiny, 512 sd15)")
    parser.add_argument("--steps", type=int, default=20, help="measured optimiser steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    parser.add_argument("--workers", type=int, help="loader workers (default: 1 cpu, 12 cuda)")
    parser.add_argument(
        "--start-method",
        choices=["spawn", "forkserver"],
        default="forkserver",
        help="how loader workers start: forkserver imports torch once for all of them",
    )
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], help="default: no / bf16")
    parser.add_argument("--work", type=Path, help="work folder, kept (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    dump_stacks_on_term()
    cuda = args.device == "cuda"
    args.size = args.size or ("sd15" if cuda else "tiny")
    args.batch_size = args.batch_size or (16 if cuda else 4)
    if args.workers is None:
        args.workers = 12 if cuda else 1
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    if not cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: Accelerate picks cpu
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="fgid-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
