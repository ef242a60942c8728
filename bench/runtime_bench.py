"""InsightFace models in onnxruntime and in torch: images/s and how far their outputs differ.

For each model of a pack (SCRFD at 640x640, ArcFace at 112, genderage at 96) it times
onnxruntime (CPU provider) and the torch runtime (fgid.backends.full.torch_onnx) in float32 and
float16 on the chosen device, and reports the largest output differences: torch float32 and
float16 against onnxruntime, and for ArcFace the lowest cosine similarity of the embeddings.
`--models real` uses the real-size random-weight models of bench/gpu_models.py, `tiny` the
test suite's tiny models (tests/tiny_full_models.py).

Run from the repository root:
  uv run python -m bench.runtime_bench [--device cpu|cuda] [--models real|tiny] [--batch B]
      [--repeats R] [--compile MODE] [--dtypes float32,float16] [--cache DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

FILES = {"scrfd": ("det_10g.onnx", 640), "arcface": ("w600k_r50.onnx", 112)}
FILES["genderage"] = ("genderage.onnx", 96)
MEAN_STD = {"scrfd": (127.5, 128.0), "arcface": (127.5, 127.5), "genderage": (0.0, 1.0)}


def pack_dir(kind: str, cache: Path) -> Path:
    """The models/buffalo_l folder of a real-size or tiny pack, built once into `cache`."""
    if kind == "tiny":
        from tests.tiny_full_models import build_insightface_pack

        root = cache / "tiny"
        if not (root / "models" / "buffalo_l" / "genderage.onnx").is_file():
            build_insightface_pack(root, batched_detector=True)
        return root / "models" / "buffalo_l"
    from bench.gpu_bench import model_files

    return Path(model_files(cache)["insightface_root"]) / "models" / "buffalo_l"


def timed(run, repeats: int, sync) -> tuple[float, list]:
    out = run()  # warm-up: allocation, kernel selection, compilation
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        out = run()
    sync()
    return (time.perf_counter() - started) / repeats, out


def differences(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return max(float(np.abs(o - r).max()) for o, r in zip(outputs, reference, strict=True))


def lowest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def bench_model(name: str, path: Path, args: argparse.Namespace) -> dict:
    import onnxruntime
    import torch

    from fgid.backends.full.torch_onnx import TorchOnnx

    side = FILES[name][1]
    batch = args.batch or {"scrfd": 4, "arcface": 32, "genderage": 64}[name]
    images = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    mean, std = MEAN_STD[name]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def onnx_run() -> list[np.ndarray]:
        # The blob is made inside the timing, as the torch runtime's normalisation is.
        blob = images.transpose(0, 3, 1, 2).astype(np.float32)
        blob -= np.float32(mean)
        blob *= np.float32(1.0 / std)
        return session.run(None, {input_name: blob})

    seconds, reference = timed(onnx_run, args.repeats, lambda: None)
    figures = {"batch": batch, "onnxruntime_cpu_images_per_s": batch / seconds}

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for label in args.dtypes.split(","):
        dtype = getattr(torch, label)
        try:
            model = TorchOnnx(path, args.device, dtype, args.compile)
            seconds, out = timed(lambda m=model: m.run(images, mean, std), args.repeats, sync)
        except (RuntimeError, NotImplementedError) as error:  # float16 kernels missing on a CPU
            figures[f"torch_{label}"] = f"failed: {str(error).splitlines()[0][:200]}"
            continue
        figures[f"torch_{label}_images_per_s"] = batch / seconds
        figures[f"torch_{label}_max_abs_diff_vs_onnxruntime"] = differences(out, reference)
        if name == "arcface":
            figures[f"torch_{label}_lowest_cosine_vs_onnxruntime"] = lowest_cosine(
                out[0], reference[0]
            )
    return figures


def main() -> None:
    import torch

    from bench.diagnose import dump_stacks_on_term

    dump_stacks_on_term()

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", choices=("real", "tiny"), default="real")
    parser.add_argument("--batch", type=int, help="default: 4 SCRFD, 32 ArcFace, 64 genderage")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", default="off", help="torch.compile mode, or off")
    parser.add_argument("--dtypes", default="float32,float16", help="torch dtypes to time")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "fgid-gpu-bench"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    pack = pack_dir(args.models, args.cache)
    figures = {
        "device": args.device,
        "models": args.models,
        "torch_threads": torch.get_num_threads(),
        "compile": args.compile,
    }
    for name, (file, _) in FILES.items():
        figures[name] = bench_model(name, pack / file, args)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
