"""ONNX models run in PyTorch (onnx2torch): InsightFace models on a GPU without onnxruntime-gpu."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

COMPILE_OFF = "off"
# Modes that replay CUDA graphs, whose output buffers the next call overwrites.
GRAPH_MODES = ("reduce-overhead", "max-autotune")


def torch_dtype(precision: str, device: str):
    """The `models.torch_precision` setting as a torch dtype: auto is float16 on CUDA (tensor
    cores; InsightFace's models are commonly served in fp16), float32 elsewhere."""
    import torch

    if precision == "auto":
        precision = "float16" if device.startswith("cuda") else "float32"
    return {"float32": torch.float32, "float16": torch.float16}[precision]


def load_graph(path: Path):
    """The ONNX graph, made readable to onnx2torch without changing what it computes."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    _inline_weight_aliases(model.graph)
    for node in model.graph.node:
        # onnx2torch 1.5 reads a missing CumSum `reverse` as 1; the ONNX default is 0.
        if node.op_type == "CumSum" and not any(a.name == "reverse" for a in node.attribute):
            node.attribute.append(helper.make_attribute("reverse", 0))
    return model


def _inline_weight_aliases(graph) -> None:
    """Point readers of `Identity(initializer)` at the initializer itself: torch's exporter
    shares equal weights that way, and onnx2torch reads a convolution's weights only from
    initializers."""
    weights = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {
        node.output[0]: node.input[0]
        for node in graph.node
        if node.op_type == "Identity" and node.input[0] in weights and node.output[0] not in outputs
    }
    if not alias:
        return
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)


class TorchOnnx:
    """One ONNX graph as a torch module on one device, in one dtype, optionally compiled.

    Batches come in as uint8 NHWC (host arrays, or page-locked tensors copied asynchronously),
    are normalised on the device in float32 as InsightFace's blobs are, cast to the model dtype,
    and laid out channels-last (the layout tensor-core convolutions read without a transpose)."""

    def __init__(self, path: Path, device: str, dtype, compile_mode: str = COMPILE_OFF):
        import torch
        from onnx2torch import convert

        self.path, self.device, self.dtype = Path(path), torch.device(device), dtype
        graph = load_graph(path)
        self.batch_axis = _input_batch(graph)
        module = static_reshapes(convert(graph)).eval().requires_grad_(False)
        module = module.to(self.device, dtype)
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if compile_mode != COMPILE_OFF:
            module = torch.compile(module, mode=compile_mode)
        self.module = module
        self.clone = compile_mode in GRAPH_MODES
        logger.info("%s in torch on %s, %s, compile %s", path, device, dtype, compile_mode)

    def blob(self, batch, mean: float, std: float, swap_rb: bool = False):
        """(batch - mean) / std on the device, NCHW in the model dtype. `batch` is uint8 NHWC:
        a numpy array or a (page-locked) torch tensor."""
        import torch

        host = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
        x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        if swap_rb:
            x = x.flip(1)
        # float32 first: (x - mean) * (1 / std) in float32 is the blob onnxruntime gets.
        x = x.float().sub_(mean).mul_(float(np.float32(1.0 / std))).to(self.dtype)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def __call__(self, blob) -> list:
        """The graph's outputs for `blob`, as float32 tensors on the device."""
        import torch

        with torch.inference_mode():
            out = self.module(blob)
            outputs = list(out) if isinstance(out, tuple | list) else [out]
            if self.clone:
                outputs = [o.clone() for o in outputs]
            return [o.float() for o in outputs]

    def run(self, batch, mean: float, std: float, swap_rb: bool = False) -> list[np.ndarray]:
        """uint8 NHWC in, the outputs as float32 host arrays."""
        return [o.cpu().numpy() for o in self(self.blob(batch, mean, std, swap_rb))]


def static_reshapes(module):
    """Give every Reshape whose target shape is a stored constant that shape as Python ints.

    onnx2torch reshapes to `torch.Size(shape_tensor)`, which torch.compile cannot trace (the
    shape is a fake tensor there): compiling SCRFD failed and fell back to one image a call.
    The 0 entries (copy the input's dimension) are resolved per call, as ONNX says."""
    import torch
    from onnx2torch.node_converters.reshape import OnnxReshape

    class Reshape(torch.nn.Module):
        def __init__(self, shape: list[int]):
            super().__init__()
            self.shape = shape

        def forward(self, x):
            return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)])

    changed = False
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        if not isinstance(module.get_submodule(node.target), OnnxReshape):
            continue
        source = node.args[1]
        if getattr(source, "op", None) != "get_attr":
            continue  # a shape computed in the graph stays onnx2torch's
        shape = module
        for part in source.target.split("."):
            shape = getattr(shape, part)
        module.add_submodule(node.target, Reshape([int(d) for d in shape.tolist()]))
        node.args = node.args[:1]
        changed = True
    if changed:
        module.graph.eliminate_dead_code()
        module.recompile()
    return module


def _input_batch(graph) -> int | None:
    """The graph input's batch dimension: an int when fixed, None when free."""
    initializers = {i.name for i in graph.graph.initializer}
    first = next(i for i in graph.graph.input if i.name not in initializers)
    dim = first.type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None
