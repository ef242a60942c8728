"""GPU benchmark of the full model set at real sizes, random weights. Prints figures only.

1. Builds, into --cache (a temp folder by default, never the repository): an SCRFD-10GF-shaped
   detector, iresnet50 ArcFace and a genderage-shaped net as ONNX with a free batch axis, and
   facexlib's BiSeNet (bench/gpu_models.py); prints their parameters and multiply-accumulates.
2. Runs fgid's own pipeline (process_shard: decode, detect, align, parse, embed, attributes;
   the template captioner stands in so LLaVA is timed apart) over 1024x1024 JPEGs made from the
   demo photos, decoding in turn and then read ahead (fgid.prefetch): images/s per stage, end
   to end, and the share of time the model stages waited for input (GPU idle).
3. Captions aligned-size crops with both prompts on a LLaVA-1.5-7B-sized model (random bf16
   weights; a tiny config on --device cpu) (bench/gpu_llava.py).
Targets on one H100: detection+alignment+parsing+embedding 500 images/s; captions 25 images/s.
GPU memory is torch's peak (BiSeNet, LLaVA) and the device's used memory (ONNX Runtime too).

Run from the repository root:
  uv run python -m bench.gpu_bench [--device cuda|cpu] [--images N] [--batch-size B]
      [--caption-images N] [--caption-batch B] [--caption-tokens T] [--llava 7b|tiny]
      [--prefetch-batches K] [--decode-workers W] [--cache DIR] [--json PATH]
      [--models real|tiny] [--runtime auto|onnxruntime|torch] [--precision auto|float32|float16]
      [--compile off|default|reduce-overhead|max-autotune]
On CUDA the InsightFace models run in torch by default (models.runtime auto; no onnxruntime-gpu
needed); `insightface_runtime` in the output says which ran. `--models tiny` swaps in the test
suite's tiny InsightFace models (a quick run of the same code). GPU utilisation wants
nvidia-ml-py or nvidia-smi.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bench.gpu_llava import build_llava, caption_speed, parameter_count
from bench.gpu_models import build_model_files
from fgid.config import BuildConfig
from fgid.protocols import ModelSet

MODELS_VERSION = "1"  # bump when bench/gpu_models.py changes what it writes
TARGET_CHAIN, TARGET_CAPTIONS = 500.0, 25.0
CHAIN = ("detect", "align", "parse", "embed")
DEFAULTS = {  # per device: images, batch, caption images, caption batch, caption tokens
    "cuda": {
        "images": 2048,
        "batch_size": 64,
        "caption_images": 128,
        "caption_batch": 64,
        "caption_tokens": 128,
        "llava": "7b",
    },
    "cpu": {
        "images": 8,
        "batch_size": 4,
        "caption_images": 4,
        "caption_batch": 2,
        "caption_tokens": 8,
        "llava": "tiny",
    },
}


class GpuSampler:
    """GPU utilisation and used memory, sampled in the background through NVML (nvidia-ml-py)
    or nvidia-smi; `figures` is None when neither is present."""

    def __init__(self, index: int, period: float = 0.2) -> None:
        self.read, self.period, self.samples = self._reader(index), period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _reader(index: int):
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)

            def nvml() -> tuple[float, float]:
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), used

            nvml()
            return nvml
        if shutil.which("nvidia-smi"):
            query = [
                "nvidia-smi",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-i",
                str(index),
            ]

            def smi() -> tuple[float, float]:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                util, used = (float(v) for v in out.strip().split(","))
                return util, used

            with contextlib.suppress(Exception):
                smi()
                return smi
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(Exception):
                self.samples.append(self.read())

    def __enter__(self) -> GpuSampler:
        if self.read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def figures(self) -> dict | None:
        if not self.samples:
            return None
        util = [u for u, _ in self.samples]
        return {
            "gpu_util_mean_pct": statistics.fmean(util),
            "gpu_util_max_pct": max(util),
            "gpu_mem_used_max_mib": max(m for _, m in self.samples),
        }


@contextlib.contextmanager
def measured(device: str, figures: dict):
    """Fill `figures` with seconds, torch's peak GPU memory and the sampler's readings."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    index = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0) if cuda else 0
    started = time.perf_counter()
    with GpuSampler(index) if cuda else contextlib.nullcontext() as sampler:
        yield
        if cuda:
            torch.cuda.synchronize()
    figures["seconds"] = time.perf_counter() - started
    if cuda:
        figures["torch_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        figures.update(sampler.figures or {"gpu_util": "unavailable (no NVML, no nvidia-smi)"})


def make_inputs(folder: Path, count: int, side: int = 1024) -> list[str]:
    """`count` JPEGs of side x side (FFHQ's size) from the demo photos and their mirror images;
    past the distinct ones, byte copies (decoding costs the same)."""
    from fgid.samples import write_samples

    bases = []
    for path in write_samples(folder / "demo"):
        with contextlib.suppress(OSError):  # the demo set holds one deliberately broken file
            photo = ImageOps.fit(Image.open(path).convert("RGB"), (side, side))
            bases += [photo, ImageOps.mirror(photo)]
    out = folder / "inputs"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        files.append(str(out / f"img{i:05d}.jpg"))
        if i < len(bases):
            bases[i].save(files[-1], quality=90)
        else:
            shutil.copyfile(files[i % len(bases)], files[-1])
    return files


def model_files(cache: Path) -> dict:
    """Build the ONNX models and BiSeNet weights once per cache folder."""
    root = cache / f"models-v{MODELS_VERSION}"
    facts_file = root / "facts.json"
    if not facts_file.is_file():
        facts = build_model_files(root)
        facts_file.write_text(json.dumps(facts, indent=2))
    return json.loads(facts_file.read_text())


def tiny_model_files(cache: Path) -> dict:
    """The test suite's tiny InsightFace pack (batched detector) and BiSeNet weights."""
    from tests.tiny_full_models import build_bisenet_weights, build_insightface_pack

    root = cache / "tiny"
    pack = build_insightface_pack(root / "insightface", batched_detector=True)
    return {"insightface_root": str(pack), "facexlib_root": str(build_bisenet_weights(root / "bn"))}


def load_models(config: BuildConfig, device: str) -> ModelSet:
    from fgid.backends.full.bisenet import BiSeNetParser
    from fgid.backends.full.device import insightface_providers
    from fgid.backends.full.insightface_models import (
        InsightFaceAttributes,
        InsightFaceDetector,
        InsightFaceEmbedder,
        model_dir,
    )
    from fgid.backends.lite.template_captioner import TemplateCaptioner

    providers = insightface_providers(config.models)
    pack = model_dir(config, ())
    return ModelSet(
        detector=InsightFaceDetector(pack, providers, config),
        parser=BiSeNetParser(config, device),
        embedder=InsightFaceEmbedder(pack, providers, config),
        attributes=InsightFaceAttributes(pack, providers, config),
        captioner=TemplateCaptioner(),
    )


def run_pipeline(files: list[str], out: Path, config: BuildConfig, models: ModelSet) -> dict:
    """One shard through fgid.pipeline.process_shard; its stats."""
    from fgid.dataset import Dataset
    from fgid.pipeline import prepare_output, process_shard

    config = config.model_copy(update={"shard_size": len(files)})
    [shard] = prepare_output(files, str(out), config)
    return process_shard(Dataset(str(out)).shard_plan(shard.shard_id), str(out), config, models)


def pipeline_figures(stats: dict) -> dict:
    stages = stats["stages"]
    rates = {f"{n}_images_per_s": t["images_per_s"] for n, t in stages.items() if n != "caption"}
    chain_s = sum(stages[n]["seconds"] for n in CHAIN)
    # Where the chain's time goes: each stage's share of it.
    shares = {f"{n}_share_of_chain": stages[n]["seconds"] / chain_s for n in CHAIN if chain_s}
    return {
        **rates,
        **shares,
        "ok": stats["ok"],
        "end_to_end_images_per_s": stats["inputs"] / stats["wall_seconds"],
        "chain_images_per_s": stages["detect"]["images"] / chain_s if chain_s else None,
        "input_wait_fraction": stages["decode"]["input_wait_fraction"],
    }


def profile_summary(run, device: str, top: int = 10) -> dict:
    """torch.profiler over `run()`: the ops with the most self time, on the host and (on CUDA)
    on the device, and how much of the wall time the device was busy."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) * 1000
    events = prof.key_averages()

    def ranked(attribute: str) -> list[dict]:
        total = sum(getattr(e, attribute) for e in events) or 1.0
        best = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:top]
        return [
            {
                "op": e.key,
                "calls": e.count,
                "self_ms": getattr(e, attribute) / 1000,
                "share": getattr(e, attribute) / total,
            }
            for e in best
        ]

    host_ms = sum(e.self_cpu_time_total for e in events) / 1000
    summary: dict = {
        "wall_ms": wall_ms,
        # The rest of the wall time is Python, OpenCV and numpy between the torch ops.
        "torch_host_fraction": host_ms / wall_ms,
        "host_ops": ranked("self_cpu_time_total"),
    }
    if cuda:
        device_ops = ranked("self_device_time_total")
        busy_ms = sum(e.self_device_time_total for e in events) / 1000
        summary |= {"device_busy_fraction": busy_ms / wall_ms, "device_ops": device_ops}
    return summary


def bench(args: argparse.Namespace, work: Path) -> dict:
    import torch

    figures: dict = {"device": args.device}
    if args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    figures["models"] = args.models
    if args.models == "tiny":
        facts = tiny_model_files(args.cache)
    else:
        facts = model_files(args.cache)
        for name in ("scrfd", "arcface", "genderage", "bisenet"):
            figures[f"{name}_params_m"] = facts[name]["params"] / 1e6
        figures["scrfd_gmacs_640x480"] = facts["scrfd"]["macs_640x480"] / 1e9
        figures["scrfd_gmacs_640x640"] = facts["scrfd"]["macs_640x640"] / 1e9
        figures["arcface_gmacs_112"] = facts["arcface"]["macs"] / 1e9
        figures["bisenet_gmacs_512"] = facts["bisenet"]["macs"] / 1e9

    config = BuildConfig(
        batch_size=args.batch_size,
        models={
            "set": "full",
            "insightface_root": facts["insightface_root"],
            "facexlib_root": facts["facexlib_root"],
            "device": args.device,
            "runtime": args.runtime,
            "torch_precision": args.precision,
            "torch_compile": args.compile,
        },
    )
    models = load_models(config, args.device)
    figures["insightface_runtime"] = models.detector.runtime.name
    if models.detector.net is None:
        figures["onnx_providers"] = models.detector.model.session.get_providers()[0]
    else:
        figures["torch_dtype"] = str(models.detector.net.dtype).removeprefix("torch.")
        figures["torch_compile"] = args.compile
    figures["scrfd_batched"] = models.detector.batched
    files = make_inputs(work, args.images)
    run_pipeline(files[: args.batch_size], work / "warmup", config, models)
    runs = {
        "in_turn": config.model_copy(update={"prefetch_batches": 0, "decode_workers": 1}),
        "read_ahead": config.model_copy(
            update={
                "prefetch_batches": args.prefetch_batches,
                "decode_workers": args.decode_workers,
            }
        ),
    }
    for name, run_config in runs.items():
        phase: dict = {}
        with measured(args.device, phase):
            stats = run_pipeline(files, work / name, run_config, models)
        figures[name] = {**pipeline_figures(stats), **phase}
    if args.profile:
        sample = files[: 2 * args.batch_size]
        run = partial(run_pipeline, sample, work / "profiled", runs["in_turn"], models)
        figures["profile_pipeline"] = profile_summary(run, args.device)
    del models

    model, processor = build_llava(args.llava, args.device)
    figures["llava"] = f"{args.llava}, {parameter_count(model):,} parameters, {model.dtype}"
    crops = [np.asarray(Image.open(f).resize((512, 512))) for f in files[: args.caption_images]]
    caption_speed(model, processor, crops[: min(2, len(crops))], 2, 2)  # warm-up
    phase = {}
    with measured(args.device, phase):
        captions = caption_speed(model, processor, crops, args.caption_batch, args.caption_tokens)
    figures["captions"] = {"batch": args.caption_batch, **captions, **phase}
    if args.profile:
        batch = crops[: args.caption_batch]
        run = partial(caption_speed, model, processor, batch, args.caption_batch, 16)
        figures["profile_captions"] = profile_summary(run, args.device)
    return figures


def report(figures: dict) -> None:
    def show(name: str, value: object, note: str = "") -> None:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {name:34s} {text}{note}")

    print(f"\n== fgid GPU bench ({figures.get('gpu', figures['device'])}) ==")
    for name, value in figures.items():
        if not isinstance(value, dict):
            show(name, value)
    for run in ("in_turn", "read_ahead"):
        print(f" pipeline, decoding {run.replace('_', ' ')}:")
        for name, value in figures[run].items():
            note = (
                f"  (target {TARGET_CHAIN:.0f} on one H100)" if name == "chain_images_per_s" else ""
            )
            show(name, value, note)
    print(" captions, both prompts:")
    for name, value in figures["captions"].items():
        note = f"  (target {TARGET_CAPTIONS:.0f} on one H100)" if name == "images_per_s" else ""
        show(name, value, note)
    for name in ("profile_pipeline", "profile_captions"):
        if name in figures:
            report_profile(name, figures[name])


def report_profile(name: str, summary: dict) -> None:
    busy = summary.get("device_busy_fraction")
    device = f", device busy {busy:.0%} of it" if busy is not None else ""
    host = f"torch ops on the host {summary['torch_host_fraction']:.0%}"
    print(f" {name.replace('_', ' ')} ({summary['wall_ms']:.0f} ms, {host}{device}):")
    for side in ("device_ops", "host_ops"):
        for op in summary.get(side, [])[:6]:
            print(f"    {side[:-4]:6s} {op['share']:6.1%} {op['self_ms']:9.1f} ms  {op['op'][:60]}")


def main() -> None:
    import torch

    from bench.diagnose import dump_stacks_on_term

    dump_stacks_on_term()

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--caption-images", type=int)
    parser.add_argument("--caption-batch", type=int)
    parser.add_argument("--caption-tokens", type=int, help="new tokens forced per caption")
    parser.add_argument("--llava", choices=("7b", "tiny"))
    parser.add_argument("--models", choices=("real", "tiny"), default="real")
    parser.add_argument("--runtime", choices=("auto", "onnxruntime", "torch"), default="auto")
    parser.add_argument("--precision", choices=("auto", "float32", "float16"), default="auto")
    parser.add_argument(
        "--compile", choices=("off", "default", "reduce-overhead", "max-autotune"), default="off"
    )
    parser.add_argument("--prefetch-batches", type=int, default=2)
    parser.add_argument("--decode-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "fgid-gpu-bench"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="add torch.profiler summaries of two pipeline batches and one caption batch",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    for key, value in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # InsightFace's norm_crop calls a scikit-image method deprecated in favour of another.
    warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")
    work = Path(tempfile.mkdtemp(prefix="fgid-gpu-bench-"))
    try:
        figures = bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
