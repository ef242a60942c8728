"""Key-and-shape manifest of ConsistentID's SDXL release (`ConsistentID_SDXL-v1.bin`), as facts.

From the public reference code (JackAILab/ConsistentID, `pipline_StableDiffusionXL_ConsistentID.py`:
`load_ConsistentID_model` loads the three groups with `strict=True`, `image_proj_model` under that
name): `ProjPlusModel(cross_attention_dim=2048, id_embeddings_dim=512, clip_embeddings_dim=1280,
num_tokens=4)` (a perceiver of depth 4, 64-wide heads), `FacialEncoder(embedding_dim=1280,
output_dim=2048, embed_dim=2048)` (its perceiver 1024 wide, depth 8, as in SD 1.5's), and
`Consistent_AttProcessor` / `Consistent_IPAttProcessor` at rank 128 with 4 ID tokens on every
attention layer of the SDXL UNet (`set_ip_adapter`: hidden size from the block's
`block_out_channels`, cross-attention width 2048). The same key names as the SD 1.5 release;
only widths and the number of attention layers differ."""

from __future__ import annotations

from tests.training.consistentid_release import FACIAL_ENCODER as SD15_FACIAL_ENCODER

# SDXL base 1.0's UNet (unet/config.json), the fields that shape its attention layers.
UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
CROSS_ATTENTION_DIM = 2048
LORA_RANK = 128
# set_ip_adapter's hidden size per block of attention layers: block_out_channels[i] for
# down_blocks.i, reversed for up_blocks.i, the last for the mid block.
HIDDEN = {
    "down_blocks.1": 640,
    "down_blocks.2": 1280,
    "up_blocks.0": 1280,
    "up_blocks.1": 640,
    "mid_block": 1280,
}


def adapter_modules(
    processors: list[str], hidden: dict[str, int], context: int, rank: int = LORA_RANK
) -> dict[str, tuple[int, ...]]:
    """The released `adapter_modules` keys for attention layers `processors` (in processor
    order): four LoRA pairs on every layer (`LoRALinearLayer`: down (rank, in), up (out, rank)),
    and `to_k_ip` / `to_v_ip` on cross-attention (`attn2`) layers."""
    keys: dict[str, tuple[int, ...]] = {}
    for i, name in enumerate(processors):
        size = hidden[name.split(".attentions")[0]]
        cross = name.endswith("attn2")
        source = context if cross else size
        for lora, width in (("to_q", size), ("to_k", source), ("to_v", source), ("to_out", size)):
            keys[f"{i}.{lora}_lora.down.weight"] = (rank, width)
            keys[f"{i}.{lora}_lora.up.weight"] = (size, rank)
        if cross:
            keys[f"{i}.to_k_ip.weight"] = (size, context)
            keys[f"{i}.to_v_ip.weight"] = (size, context)
    return keys


IMAGE_PROJ: dict[str, tuple[int, ...]] = {
    "proj.0.weight": (1024, 512),
    "proj.0.bias": (1024,),
    "proj.2.weight": (8192, 1024),
    "proj.2.bias": (8192,),
    "norm.weight": (2048,),
    "norm.bias": (2048,),
    "perceiver_resampler.proj_in.weight": (2048, 1280),
    "perceiver_resampler.proj_in.bias": (2048,),
    "perceiver_resampler.proj_out.weight": (2048, 2048),
    "perceiver_resampler.proj_out.bias": (2048,),
    "perceiver_resampler.norm_out.weight": (2048,),
    "perceiver_resampler.norm_out.bias": (2048,),
    "perceiver_resampler.layers.0.0.norm1.weight": (2048,),
    "perceiver_resampler.layers.0.0.norm1.bias": (2048,),
    "perceiver_resampler.layers.0.0.norm2.weight": (2048,),
    "perceiver_resampler.layers.0.0.norm2.bias": (2048,),
    "perceiver_resampler.layers.0.0.to_q.weight": (2048, 2048),
    "perceiver_resampler.layers.0.0.to_kv.weight": (4096, 2048),
    "perceiver_resampler.layers.0.0.to_out.weight": (2048, 2048),
    "perceiver_resampler.layers.0.1.0.weight": (2048,),
    "perceiver_resampler.layers.0.1.0.bias": (2048,),
    "perceiver_resampler.layers.0.1.1.weight": (8192, 2048),
    "perceiver_resampler.layers.0.1.3.weight": (2048, 8192),
    "perceiver_resampler.layers.1.0.norm1.weight": (2048,),
    "perceiver_resampler.layers.1.0.norm1.bias": (2048,),
    "perceiver_resampler.layers.1.0.norm2.weight": (2048,),
    "perceiver_resampler.layers.1.0.norm2.bias": (2048,),
    "perceiver_resampler.layers.1.0.to_q.weight": (2048, 2048),
    "perceiver_resampler.layers.1.0.to_kv.weight": (4096, 2048),
    "perceiver_resampler.layers.1.0.to_out.weight": (2048, 2048),
    "perceiver_resampler.layers.1.1.0.weight": (2048,),
    "perceiver_resampler.layers.1.1.0.bias": (2048,),
    "perceiver_resampler.layers.1.1.1.weight": (8192, 2048),
    "perceiver_resampler.layers.1.1.3.weight": (2048, 8192),
    "perceiver_resampler.layers.2.0.norm1.weight": (2048,),
    "perceiver_resampler.layers.2.0.norm1.bias": (2048,),
    "perceiver_resampler.layers.2.0.norm2.weight": (2048,),
    "perceiver_resampler.layers.2.0.norm2.bias": (2048,),
    "perceiver_resampler.layers.2.0.to_q.weight": (2048, 2048),
    "perceiver_resampler.layers.2.0.to_kv.weight": (4096, 2048),
    "perceiver_resampler.layers.2.0.to_out.weight": (2048, 2048),
    "perceiver_resampler.layers.2.1.0.weight": (2048,),
    "perceiver_resampler.layers.2.1.0.bias": (2048,),
    "perceiver_resampler.layers.2.1.1.weight": (8192, 2048),
    "perceiver_resampler.layers.2.1.3.weight": (2048, 8192),
    "perceiver_resampler.layers.3.0.norm1.weight": (2048,),
    "perceiver_resampler.layers.3.0.norm1.bias": (2048,),
    "perceiver_resampler.layers.3.0.norm2.weight": (2048,),
    "perceiver_resampler.layers.3.0.norm2.bias": (2048,),
    "perceiver_resampler.layers.3.0.to_q.weight": (2048, 2048),
    "perceiver_resampler.layers.3.0.to_kv.weight": (4096, 2048),
    "perceiver_resampler.layers.3.0.to_out.weight": (2048, 2048),
    "perceiver_resampler.layers.3.1.0.weight": (2048,),
    "perceiver_resampler.layers.3.1.0.bias": (2048,),
    "perceiver_resampler.layers.3.1.1.weight": (8192, 2048),
    "perceiver_resampler.layers.3.1.3.weight": (2048, 8192),
}

# The facial perceiver is SD 1.5's (1024 wide); its output and the fusion are 2048 wide.
FACIAL_ENCODER: dict[str, tuple[int, ...]] = {
    **SD15_FACIAL_ENCODER,
    "visual_projection.proj_out.weight": (2048, 1024),
    "visual_projection.proj_out.bias": (2048,),
    "visual_projection.norm_out.weight": (2048,),
    "visual_projection.norm_out.bias": (2048,),
    "fuse_module.mlp1.layernorm.weight": (4096,),
    "fuse_module.mlp1.layernorm.bias": (4096,),
    "fuse_module.mlp1.fc1.weight": (2048, 4096),
    "fuse_module.mlp1.fc1.bias": (2048,),
    "fuse_module.mlp1.fc2.weight": (2048, 2048),
    "fuse_module.mlp1.fc2.bias": (2048,),
    "fuse_module.mlp2.layernorm.weight": (2048,),
    "fuse_module.mlp2.layernorm.bias": (2048,),
    "fuse_module.mlp2.fc1.weight": (2048, 2048),
    "fuse_module.mlp2.fc1.bias": (2048,),
    "fuse_module.mlp2.fc2.weight": (2048, 2048),
    "fuse_module.mlp2.fc2.bias": (2048,),
    "fuse_module.layer_norm.weight": (2048,),
    "fuse_module.layer_norm.bias": (2048,),
}
