"""Tiny stand-ins for the full model set, saved under the real file names and formats.

The real weights (InsightFace buffalo_l, BiSeNet, LLaVA-1.5) cannot be downloaded in CI, so
tests build small seeded models that the real loading code accepts unchanged:
- `build_insightface_pack`: det_10g.onnx / w600k_r50.onnx / genderage.onnx in InsightFace's
  layout, with the signatures its model router sends to SCRFD / ArcFaceONNX / Attribute. The
  detector has a fixed batch of 1 like the buffalo_l release; `batched_detector=True` gives it a
  free batch axis and batch-first (N, anchors, C) outputs, as SCRFD exports with dynamic axes have.
- `build_bisenet_weights`: facexlib's BiSeNet architecture with random weights.
- `build_tiny_llava`: a LLaVA-1.5-shaped model, tokenizer and processor saved with save_pretrained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SEED = 0

# The tiny SCRFD reports one face centred on the stride-8 anchor nearest the middle of the detector
# canvas. Distances are in stride units, as SCRFD's decoder expects (left, top, right, bottom).
DET_STRIDE = 8
DET_SCORE = 0.9
DET_BOX = (12.0, 16.0, 12.0, 16.0)
# InsightFace kps order: eye (image left), eye (image right), nose, mouth left, mouth right.
DET_KPS = ((-4.0, -4.0), (4.0, -4.0), (0.0, 2.0), (-3.5, 7.0), (3.5, 7.0))
INSIGHTFACE_NAME = "buffalo_l"
LLAVA_IMAGE_SIZE = 30
LLAVA_PATCH = 6


def expected_face(image_shape: tuple[int, ...], det_size: tuple[int, int] = (640, 640)) -> dict:
    """Where the tiny detector puts its face in an image of this shape (source pixels).

    Mirrors SCRFD's letterboxing: the image is scaled to fit det_size and pasted top-left."""
    height, width = image_shape[:2]
    det_w, det_h = det_size
    if height / width > det_h / det_w:
        new_h = det_h
        scale = new_h / height
    else:
        new_w = det_w
        new_h = int(new_w * height / width)
        scale = new_h / height
    cx = (det_w // DET_STRIDE // 2) * DET_STRIDE
    cy = (det_h // DET_STRIDE // 2) * DET_STRIDE
    left, top, right, bottom = (v * DET_STRIDE for v in DET_BOX)
    box = np.array([cx - left, cy - top, cx + right, cy + bottom], dtype=np.float32) / scale
    kps = (np.array(DET_KPS, dtype=np.float32) * DET_STRIDE + [cx, cy]) / scale
    return {"box": box, "landmarks": kps.astype(np.float32), "score": DET_SCORE}


# --- InsightFace pack --------------------------------------------------------------------------


def _save_onnx(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # Pin an IR version every onnxruntime 1.17+ reads.
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _detector_graph(batched: bool = False):
    """SCRFD-shaped graph: 9 outputs (scores, boxes, kps for strides 8/16/32, 2 anchors each).

    The score peaks at the centre anchor of stride 8 and is gated by the input's variance, so a
    flat image has no face and a photo has exactly one. Batched: input (N, 3, H, W), each image
    gated by its own variance, outputs (N, anchors, C); otherwise batch 1 and (anchors, C)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"det_{output}", **attrs))
        return output

    f32 = np.float32
    const("zero", f32(0.0))
    const("one", f32(1.0))
    const("two", f32(2.0))
    const("axis2", np.int64(2))
    const("axis3", np.int64(3))
    # Reshape's 0 copies the batch axis, so candidates stay per image.
    lead = [0, -1] if batched else [-1]
    const("shape_s", np.array([*lead, 1], np.int64))
    const("shape_b", np.array([*lead, 4], np.int64))
    const("shape_k", np.array([*lead, 10], np.int64))
    const("box_d", np.tile(np.array(DET_BOX, f32), 2))
    const("kps_d", np.tile(np.array(DET_KPS, f32).ravel(), 2))
    const("peak_gain", f32(DET_SCORE))
    const("peak_sharp", f32(-10.0))
    const("gate_gain", f32(1000.0))

    # Variance gate: 0 for a constant image, 1 for anything with texture.
    per_image = {"axes": [1, 2, 3]} if batched else {}
    node("ReduceMean", ["input.1"], "mean", keepdims=1, **per_image)
    node("Sub", ["input.1", "mean"], "centred")
    node("Mul", ["centred", "centred"], "sq")
    node("ReduceMean", ["sq"], "var", keepdims=int(batched), **per_image)
    node("Mul", ["var", "gate_gain"], "var_gain")
    node("Clip", ["var_gain", "zero", "one"], "gate")

    outputs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for s in (8, 16, 32):
        node("AveragePool", ["input.1"], f"pool{s}", kernel_shape=[s, s], strides=[s, s])
        node("ReduceMean", [f"pool{s}"], f"chan{s}", axes=[1], keepdims=1)
        node("Mul", [f"chan{s}", "zero"], f"nil{s}")
        node("Add", [f"nil{s}", "one"], f"ones{s}")  # (1, 1, h, w)
        if s == DET_STRIDE:
            node("CumSum", [f"ones{s}", "axis2"], "row1")
            node("CumSum", [f"ones{s}", "axis3"], "col1")
            for axis, grid in (("row", "row1"), ("col", "col1")):
                # Centre index floor(n / 2) where n is the grid length along this axis.
                node("ReduceMax", [grid], f"{axis}_n", keepdims=0)
                node("Div", [f"{axis}_n", "two"], f"{axis}_half")
                node("Floor", [f"{axis}_half"], f"{axis}_c")
                node("Sub", [grid, "one"], f"{axis}_i")
                node("Sub", [f"{axis}_i", f"{axis}_c"], f"{axis}_d")
                node("Mul", [f"{axis}_d", f"{axis}_d"], f"{axis}_d2")
            node("Add", ["row_d2", "col_d2"], "dist2")
            node("Mul", ["dist2", "peak_sharp"], "logit")
            node("Exp", ["logit"], "peak")
            node("Mul", ["peak", "peak_gain"], "peak_s")
            node("Mul", ["peak_s", "gate"], f"anchor0_{s}")
        else:
            node("Mul", [f"ones{s}", "zero"], f"anchor0_{s}")
        node("Mul", [f"ones{s}", "zero"], f"anchor1_{s}")
        # SCRFD orders candidates (y, x, anchor): channels-last, then flatten.
        node("Concat", [f"anchor0_{s}", f"anchor1_{s}"], f"anchors{s}", axis=1)
        node("Transpose", [f"anchors{s}"], f"anchors_t{s}", perm=[0, 2, 3, 1])
        outputs["score"].append(node("Reshape", [f"anchors_t{s}", "shape_s"], f"score_{s}"))
        node("Transpose", [f"ones{s}"], f"ones_t{s}", perm=[0, 2, 3, 1])
        node("Mul", [f"ones_t{s}", "box_d"], f"box_m{s}")
        outputs["bbox"].append(node("Reshape", [f"box_m{s}", "shape_b"], f"bbox_{s}"))
        node("Mul", [f"ones_t{s}", "kps_d"], f"kps_m{s}")
        outputs["kps"].append(node("Reshape", [f"kps_m{s}", "shape_k"], f"kps_{s}"))

    width = {"score": 1, "bbox": 4, "kps": 10}
    batch = ["N"] if batched else []
    graph_outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [*batch, f"n_{name}", width[kind]])
        for kind in ("score", "bbox", "kps")
        for name in outputs[kind]
    ]
    graph_input = helper.make_tensor_value_info(
        "input.1", TensorProto.FLOAT, ["N" if batched else 1, 3, "height", "width"]
    )
    return helper.make_graph(nodes, "tiny_scrfd", [graph_input], graph_outputs, inits)


def _linear_head_graph(name: str, side: int, pool: int, weight: np.ndarray, bias: np.ndarray):
    """Batched image -> average pool -> flatten -> linear, the shape ArcFace/genderage expose."""
    from onnx import TensorProto, helper, numpy_helper

    # Node names must not start with Sub/Mul: InsightFace reads that as an MXNet export and
    # switches off its own input normalisation.
    nodes = [
        helper.make_node(
            "AveragePool",
            ["data"],
            ["pooled"],
            name="pool",
            kernel_shape=[pool] * 2,
            strides=[pool] * 2,
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "weight", "bias"], ["output"], name="fc"),
    ]
    inits = [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")]
    graph_input = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, side, side])
    graph_output = helper.make_tensor_value_info(
        "output", TensorProto.FLOAT, ["N", weight.shape[1]]
    )
    return helper.make_graph(nodes, name, [graph_input], [graph_output], inits)


def build_insightface_pack(
    root: Path, name: str = INSIGHTFACE_NAME, batched_detector: bool = False
) -> Path:
    """Write `<root>/models/<name>/{det_10g,w600k_r50,genderage}.onnx`; return root."""
    pack = Path(root) / "models" / name
    pack.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    _save_onnx(_detector_graph(batched_detector), pack / "det_10g.onnx")
    # ArcFace: 112x112 in, 512-d out; pooling to 14x14 keeps it input-dependent but tiny.
    rec_w = rng.normal(0.0, 0.1, size=(3 * 14 * 14, 512)).astype(np.float32)
    rec_b = np.zeros(512, np.float32)
    _save_onnx(_linear_head_graph("tiny_arcface", 112, 8, rec_w, rec_b), pack / "w600k_r50.onnx")
    # genderage: 96x96 in, (female logit, male logit, age / 100) out.
    ga_w = rng.normal(0.0, 1.0, size=(3, 3)).astype(np.float32)
    ga_w[:, 2] *= 0.05
    ga_b = np.array([0.0, 0.0, 0.35], np.float32)
    _save_onnx(_linear_head_graph("tiny_genderage", 96, 96, ga_w, ga_b), pack / "genderage.onnx")
    return Path(root)


# --- BiSeNet -----------------------------------------------------------------------------------


def build_bisenet_weights(root: Path) -> Path:
    """Write `<root>/parsing_bisenet.pth`: facexlib's BiSeNet with seeded random weights."""
    import torch
    from facexlib.parsing.bisenet import BiSeNet

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = BiSeNet(num_class=19)
    torch.save(model.state_dict(), root / "parsing_bisenet.pth")
    return root


# --- LLaVA -------------------------------------------------------------------------------------


def _char_tokenizer():
    """A character-level fast tokenizer: one printable ASCII character per token."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    # BPE without merges splits text into single characters and maps the rest to <unk>.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
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


def build_tiny_llava(root: Path) -> Path:
    """Save a tiny LLaVA-1.5-shaped model + processor to `<root>/tiny-llava`; return that dir."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(root) / "tiny-llava"
    tokenizer = _char_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    n_patches = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=LLAVA_IMAGE_SIZE,
        patch_size=LLAVA_PATCH,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=n_patches,  # "default" strategy drops CLS: one token per patch
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # One explicit small-normal init for every matrix: with the library defaults the tiny
        # model ignores its image and says the same thing for every input.
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.02)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, as in the llava-hf processors
    )
    processor.save_pretrained(out)
    return out
