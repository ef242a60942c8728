"""The `models.device` setting as torch device and ONNX Runtime providers; batches to the GPU."""

from __future__ import annotations

import logging

import numpy as np

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


def insightface_providers(models) -> list:
    """The ONNX Runtime providers for the InsightFace models of `models` (a ModelsConfig): only
    the onnxruntime runtime needs them, and asking for CUDA ones warns when it has none."""
    runtime = insightface_runtime(models.runtime, str(torch_device(models.device)))
    return onnx_providers(models.device) if runtime == "onnxruntime" else [CPU_PROVIDER]


def onnx_cuda_device(session) -> int | None:
    """The CUDA device an ONNX Runtime session runs on, if torch sees it too (batches are staged
    and normalised there with torch); None when the session runs on the CPU."""
    if CUDA_PROVIDER not in session.get_providers():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    options = session.get_provider_options().get(CUDA_PROVIDER, {})
    return int(options.get("device_id", 0))


def pinned_zeros(shape: tuple[int, ...], pinned: bool) -> tuple[np.ndarray, object]:
    """A zeroed uint8 host array and the torch tensor owning it, page-locked when `pinned`.

    Page-locked memory lets the copy to the GPU run as an asynchronous DMA; torch's caching
    host allocator reuses the block once the copies that read it have finished."""
    if not pinned:
        return np.zeros(shape, np.uint8), None
    import torch

    tensor = torch.zeros(shape, dtype=torch.uint8, pin_memory=True)
    return tensor.numpy(), tensor


def run_normalised(
    session,
    batch: np.ndarray,
    pinned: object,
    mean: float,
    std: float,
    cuda_device: int | None,
) -> list[np.ndarray]:
    """Run `session` on (batch - mean) / std: uint8 NHWC in, float32 NCHW to the model.

    On CUDA the uint8 batch (a quarter of the float bytes) goes to the GPU, from `pinned` (the
    page-locked tensor holding it, if any) by an asynchronous copy, is normalised there and
    bound to the session by IO binding; elsewhere the blob is made with numpy. Both compute
    (x - mean) * (1 / std) in float32, which for InsightFace's 127.5 and 128 is exact, so both
    give the blob cv2.dnn.blobFromImages gives."""
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    scale = np.float32(1.0 / std)
    if cuda_device is None:
        blob = batch.transpose(0, 3, 1, 2).astype(np.float32)
        blob -= np.float32(mean)
        blob *= scale
        return session.run(outputs, {name: blob})
    import torch

    device = torch.device("cuda", cuda_device)
    host = pinned if pinned is not None else torch.from_numpy(np.ascontiguousarray(batch))
    x = host.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    blob = x.sub_(mean).mul_(float(scale)).contiguous()
    # ONNX Runtime reads the input on its own stream: the copy and kernels above must be done.
    torch.cuda.current_stream(device).synchronize()
    binding = session.io_binding()
    binding.bind_input(name, "cuda", cuda_device, np.float32, tuple(blob.shape), blob.data_ptr())
    for output in outputs:
        binding.bind_output(output, "cpu")
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


def insightface_runtime(runtime: str, device: str) -> str:
    """The `models.runtime` setting resolved for a torch device ("cpu", "cuda", "cuda:N").

    auto: torch on CUDA, where onnxruntime would need onnxruntime-gpu paired with the machine's
    CUDA and cuDNN; onnxruntime on the CPU, where it runs these models faster than torch."""
    if runtime == "auto":
        return "torch" if device.startswith("cuda") else "onnxruntime"
    return runtime
