"""Turn the `models.device` setting into a torch device and ONNX Runtime providers."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def torch_device(spec: str) -> str:
    """Map "auto" to "cuda" when torch sees a GPU, else "cpu"; check explicit values."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        # Fail at load time, not on the first batch deep inside a shard.
        raise RuntimeError(f"models.device={spec!r} but torch sees no CUDA device")
    return spec


def onnx_providers(spec: str) -> list:
    """ONNX Runtime providers for `spec`: CUDA first when wanted and available, CPU always last.

    Explicit providers, rather than InsightFace's default list, keep CoreML out and honour
    "cpu" even on a GPU machine."""
    import onnxruntime

    if spec == "cpu":
        return [CPU_PROVIDER]
    available = onnxruntime.get_available_providers()
    if CUDA_PROVIDER not in available:
        if spec.startswith("cuda"):
            # onnxruntime (CPU build) and onnxruntime-gpu are separate wheels; torch may see the
            # GPU while ONNX Runtime cannot.
            logger.warning(
                "models.device=%s but this ONNX Runtime has no CUDA provider; "
                "InsightFace models run on CPU (install onnxruntime-gpu for CUDA)",
                spec,
            )
        return [CPU_PROVIDER]
    device_id = int(spec.split(":", 1)[1]) if spec.startswith("cuda:") else 0
    return [(CUDA_PROVIDER, {"device_id": device_id}), CPU_PROVIDER]
