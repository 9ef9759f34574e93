"""Vision-language demo checkpoints: Qwen2.5-VL's layout, and the processor files every VL demo ships.

Contract: qwen2_5_vl_config(size) is Qwen2.5-VL-3B-Instruct's config.json (flat text fields plus
vision_config, mrope) with the qwen2 demo table's text dimensions and a scaled-down vision tower;
qwen2_5_vl_tensor_shapes(config) lists its tensors under the hub download's names (model.*, visual.*, the
Qwen2 text stack; tied embeddings as in the 3B). write_processor_files() writes preprocessor_config.json
(and the processor / video configs) as the hub's Qwen2.5-VL and Qwen3.5 repos ship them, so transformers'
AutoProcessor and llama.cpp's converter read the real patch size and normalisation. demo.py owns the rest
(random values, tokenizer, atomic write); this module only describes shapes and files.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "QWEN2_5_VL_VISION",
    "VLVisionDims",
    "qwen2_5_vl_config",
    "qwen2_5_vl_tensor_shapes",
    "qwen3_vl_config",
    "qwen3_vl_tensor_shapes",
    "vision_values",
    "write_processor_files",
]

# Qwen2.5-VL's special-token ids (the Qwen2 vocabulary's added tokens), as in its config.json.
VISION_START_ID, VISION_END_ID, VISION_PAD_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = (
    151652,
    151653,
    151654,
    151655,
    151656,
)
# OpenAI CLIP's normalisation, which Qwen2-VL and Qwen2.5-VL's image processors use.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class VLVisionDims:
    """Qwen2.5-VL's vision tower: window attention, with full attention every `full_every`-th block."""

    depth: int
    hidden: int
    heads: int
    intermediate: int
    full_every: int
    mrope_section: tuple[int, int, int]  # the text model's (time, height, width) split of head_dim / 2


# Qwen2.5-VL-3B: depth 32, hidden 1280, 16 heads, FFN 3420, full attention in blocks 7, 15, 23, 31, patch 14,
# window 112; text mrope_section [16, 24, 24] of head_dim 128. Scaled to the qwen2 demo table's text sizes.
QWEN2_5_VL_VISION: dict[str, VLVisionDims] = {
    "tiny": VLVisionDims(depth=4, hidden=32, heads=2, intermediate=64, full_every=2, mrope_section=(2, 3, 3)),
    "small": VLVisionDims(
        depth=4, hidden=64, heads=4, intermediate=128, full_every=2, mrope_section=(4, 6, 6)
    ),
}
PATCH_SIZE = 14
WINDOW_SIZE = 112


def qwen2_5_vl_config(text: Mapping[str, Any], size: str) -> dict[str, Any]:
    """config.json: the qwen2 demo's text fields `text` (flat, as on the hub) plus the vision tower."""
    if size not in QWEN2_5_VL_VISION:
        # A ValueError like demo.DemoError (which this module cannot import: demo.py imports it).
        raise ValueError(f"demo size {size!r} is not made for qwen2_5_vl: use one of tiny, small")
    v = QWEN2_5_VL_VISION[size]
    config = {k: val for k, val in text.items() if k not in ("sliding_window", "max_window_layers")}
    config |= {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "image_token_id": IMAGE_PAD_ID,
        "max_position_embeddings": 128000,
        "max_window_layers": text["num_hidden_layers"],
        "model_type": "qwen2_5_vl",
        "rope_scaling": {"mrope_section": list(v.mrope_section), "rope_type": "default", "type": "mrope"},
        "sliding_window": 32768,
        "video_token_id": VIDEO_PAD_ID,
        "vision_end_token_id": VISION_END_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_token_id": VISION_PAD_ID,
        "vision_config": {
            "depth": v.depth,
            "fullatt_block_indexes": list(range(v.full_every - 1, v.depth, v.full_every)),
            "hidden_act": "silu",
            "hidden_size": v.hidden,
            "in_channels": 3,
            "in_chans": 3,
            "intermediate_size": v.intermediate,
            "model_type": "qwen2_5_vl",
            "num_heads": v.heads,
            "out_hidden_size": text["hidden_size"],
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "spatial_patch_size": PATCH_SIZE,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": WINDOW_SIZE,
        },
    }
    return config


def _vision_shapes(v: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, inter, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    merged = hidden * v["spatial_merge_size"] ** 2
    # Qwen2.5-VL's Conv3d patch embedding has no bias; norms are RMSNorm (weight only).
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (hidden, v["in_channels"], v["temporal_patch_size"], patch, patch)
    }
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        shapes |= {
            p + "norm1.weight": (hidden,),
            p + "norm2.weight": (hidden,),
            p + "attn.qkv.weight": (3 * hidden, hidden),
            p + "attn.qkv.bias": (3 * hidden,),
            p + "attn.proj.weight": (hidden, hidden),
            p + "attn.proj.bias": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.gate_proj.bias": (inter,),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.up_proj.bias": (inter,),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "mlp.down_proj.bias": (hidden,),
        }
    shapes |= {
        "visual.merger.ln_q.weight": (hidden,),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (v["out_hidden_size"], merged),
        "visual.merger.mlp.2.bias": (v["out_hidden_size"],),
    }
    return shapes


def qwen2_5_vl_tensor_shapes(
    config: Mapping[str, Any], text_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The hub layout: the Qwen2 text stack's tensors (`text_shapes`, model.* / lm_head) then visual.*."""
    return {**text_shapes, **_vision_shapes(config["vision_config"])}


# Qwen3-VL-2B-Instruct: vision depth 24, hidden 1024, 16 heads, FFN 4096, deepstack from blocks 5, 11, 17,
# a 48x48 position grid; text mrope_section [24, 20, 20] of head_dim 128, interleaved, theta 5e6. The tiny
# demo keeps three deepstack blocks, so its image rows are 4 x the text width (llama.cpp concatenates them).
# Its text stack is the qwen3 demo's with 4 layers (more than the 3 deepstack blocks, as llama.cpp needs).
QWEN3_VL_VISION: dict[str, dict[str, Any]] = {
    "tiny": {"depth": 4, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "deepstack": [1, 2, 3]},
    "small": {
        "depth": 4,
        "hidden_size": 64,
        "num_heads": 4,
        "intermediate_size": 128,
        "deepstack": [1, 2, 3],
    },
}


def qwen3_vl_config(text: Mapping[str, Any], size: str) -> dict[str, Any]:
    """config.json: Qwen3-VL's nested text_config (the qwen3 demo's fields `text`) plus the vision tower."""
    if size not in QWEN3_VL_VISION:
        raise ValueError(f"demo size {size!r} is not made for qwen3_vl: use one of tiny, small")
    v = QWEN3_VL_VISION[size]
    half = text["head_dim"] // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text_config = {
        k: val for k, val in text.items() if k not in ("architectures", "qwenkit_demo", "sliding_window")
    }
    text_config |= {
        # llama.cpp's qwen3vl graph adds a deepstack row in each of the first len(deepstack) layers and
        # needs a text layer after them (it aborts otherwise), as every Qwen3-VL release has.
        "num_hidden_layers": max(text["num_hidden_layers"], len(v["deepstack"]) + 1),
        "model_type": "qwen3_vl_text",
        "max_position_embeddings": 262144,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": section, "rope_type": "default"},
        "rope_theta": 5000000,
    }
    for key in ("use_sliding_window", "max_window_layers", "torch_dtype"):
        text_config.pop(key, None)
    text_config["dtype"] = "bfloat16"
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": IMAGE_PAD_ID,
        "model_type": "qwen3_vl",
        "text_config": text_config,
        "tie_word_embeddings": text["tie_word_embeddings"],
        "video_token_id": VIDEO_PAD_ID,
        "vision_end_token_id": VISION_END_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_config": {
            "deepstack_visual_indexes": list(v["deepstack"]),
            "depth": v["depth"],
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v["hidden_size"],
            "in_channels": 3,
            "initializer_range": text["initializer_range"],
            "intermediate_size": v["intermediate_size"],
            "model_type": "qwen3_vl",
            "num_heads": v["num_heads"],
            "num_position_embeddings": 16,
            "out_hidden_size": text["hidden_size"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }


def qwen3_vl_tensor_shapes(
    config: Mapping[str, Any],
    text_shapes: Mapping[str, tuple[int, ...]],
    vision_shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, tuple[int, ...]]:
    """Qwen3-VL's hub layout: the qwen3 text stack under model.language_model.*, the Qwen3.5-style tower
    (`vision_shapes`) under model.visual.*, plus one deepstack merger per deepstack block."""
    shapes = {name.replace("model.", "model.language_model.", 1): s for name, s in text_shapes.items()}
    shapes |= vision_shapes
    v = config["vision_config"]
    merged = v["hidden_size"] * v["spatial_merge_size"] ** 2
    for i in range(len(v["deepstack_visual_indexes"])):
        p = f"model.visual.deepstack_merger_list.{i}."
        # The deepstack mergers normalise after the 2x2 shuffle, so their norm spans the merged width.
        shapes |= {
            p + "norm.weight": (merged,),
            p + "norm.bias": (merged,),
            p + "linear_fc1.weight": (merged, merged),
            p + "linear_fc1.bias": (merged,),
            p + "linear_fc2.weight": (v["out_hidden_size"], merged),
            p + "linear_fc2.bias": (v["out_hidden_size"],),
        }
    return shapes


def vision_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random vision-tower values that make every tensor matter, so a parity test notices a wrong one.

    Matrices and kernels: normal / sqrt(fan-in), drawn from the checkpoint's `rng` (one draw per element, as
    before, so the tensors after the tower keep their values). Norm weights 1 + N(0, 0.1) and biases N(0, 0.1)
    come from a generator seeded by the name: they draw nothing from `rng`.
    """
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in**-0.5)
    side = np.random.default_rng(zlib.crc32(name.encode()))
    noise = side.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
    is_norm = "norm" in name.rsplit(".", 2)[-2] or ".ln_q." in name
    return (1 + noise) if is_norm and name.endswith(".weight") else noise


def _processor_files(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    v = config["vision_config"]
    if config["model_type"] == "qwen2_5_vl":
        # Qwen/Qwen2.5-VL-3B-Instruct's preprocessor_config.json.
        image = {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_processor_type": "Qwen2VLImageProcessor",
            "image_std": CLIP_STD,
            "max_pixels": 12845056,
            "merge_size": v["spatial_merge_size"],
            "min_pixels": 3136,
            "patch_size": v["patch_size"],
            "processor_class": "Qwen2_5_VLProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "temporal_patch_size": v["temporal_patch_size"],
        }
        return {"preprocessor_config.json": image}
    # Qwen/Qwen3.5-0.8B's preprocessor_config.json and video_preprocessor_config.json.
    image = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": v["spatial_merge_size"],
        "patch_size": v["patch_size"],
        "processor_class": "Qwen3VLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "temporal_patch_size": v["temporal_patch_size"],
    }
    video = image | {
        "fps": 2,
        "max_frames": 768,
        "min_frames": 4,
        "size": {"longest_edge": 25165824, "shortest_edge": 4096},
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    del video["image_processor_type"]
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def write_processor_files(directory: Path, config: Mapping[str, Any]) -> None:
    """The image (and video) processor configs a VL hub download has; nothing for a text-only config."""
    if not isinstance(config.get("vision_config"), Mapping):
        return
    for name, data in _processor_files(config).items():
        (directory / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
