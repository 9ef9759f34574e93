"""Built-in demo checkpoints: random-weight Qwen models laid out exactly like a Hugging Face hub download.

Contract: create_demo() writes config.json (the hub's field names for qwen2/qwen3/qwen3_moe, plus a
"qwenkit_demo" marker), generation_config.json, model.safetensors (bf16, hub tensor names), the real Qwen
tokenizer files with the flavour's chat template, and a README saying the weights are random. Same arguments
give byte-identical files; nothing is downloaded. Directories appear atomically (built aside, then renamed)
and a directory that is not a demo is never overwritten. The weights are noise: outputs are meaningless.
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

from qwenkit.chat.flavor import Flavor, flavor_for_model_type
from qwenkit.chat.template import chat_template
from qwenkit.paths import cache_root
from qwenkit.tokenizer.build import write_tokenizer_files
from qwenkit.tokenizer.specials import ADDED_TOKEN_IDS, CONFIG_VOCAB_SIZE, ENDOFTEXT, IM_END

# Bump when the files create_demo() writes change, so ensure_default_demo() rebuilds stale copies.
DEMO_FORMAT_VERSION = 1
DEMO_MARKER = "qwenkit_demo"
INITIALIZER_RANGE = 0.02
DEMO_NOTICE = (
    "Using the built-in demo model: its weights are random, so it outputs noise. "
    "Pass a real model with --model Qwen/Qwen3-0.6B (or a local directory or .gguf file)."
)

BOS_ID = ADDED_TOKEN_IDS[ENDOFTEXT]  # 151643, as in every Qwen config
EOS_ID = ADDED_TOKEN_IDS[IM_END]  # 151645: the instruct/chat models stop at <|im_end|>


class DemoError(ValueError):
    """A demo checkpoint cannot be created where asked; the message is one line naming the fix."""


class DemoArch(StrEnum):
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    QWEN3_MOE = "qwen3_moe"


class DemoSize(StrEnum):
    TINY = "tiny"
    SMALL = "small"
    # Real shapes (Qwen2.5-0.5B and Qwen2.5-1.5B dimensions) for benchmarks and the planner's accuracy check.
    B0_5 = "0.5b"
    B1_5 = "1.5b"


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
}
_ARCHITECTURES = {
    DemoArch.QWEN2: "Qwen2ForCausalLM",
    DemoArch.QWEN3: "Qwen3ForCausalLM",
    DemoArch.QWEN3_MOE: "Qwen3MoeForCausalLM",
}


def demo_config(arch: DemoArch, size: DemoSize, seed: int = 0) -> dict[str, Any]:
    """config.json for a demo: the reference model's fields, with the demo's dimensions."""
    arch, size = _arch(arch), _size(size)
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
    config[DEMO_MARKER] = {
        "version": DEMO_FORMAT_VERSION,
        "random_weights": True,
        "arch": arch.value,
        "size": size.value,
        "seed": seed,
        "mirrors": _REFERENCE_MODEL[arch],
    }
    return config


def demo_generation_config(arch: DemoArch) -> dict[str, Any]:
    """generation_config.json as the reference model ships it."""
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


def demo_tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint (hub names, in a fixed order) and its shape."""
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


def demo_tensors(config: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Random bf16 weights: normal(0, initializer_range), RMSNorm weights 1, drawn in a fixed order."""
    rng = np.random.default_rng(seed)
    std = float(config["initializer_range"])
    tensors: dict[str, np.ndarray] = {}
    for name, shape in demo_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            values = np.ones(shape, dtype=np.float32)
        else:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        tensors[name] = values.astype(ml_dtypes.bfloat16)
    return tensors


def _readme(config: Mapping[str, Any]) -> str:
    marker = config[DEMO_MARKER]
    return (
        f"# qwenkit demo checkpoint: {marker['arch']} ({marker['size']})\n\n"
        "**These weights are random.** This model produces noise, not language. It exists for tests and\n"
        f"demos: it has the architecture of {marker['mirrors']} (with small dimensions), the real Qwen\n"
        "tokenizer and chat template, and loads wherever a Hugging Face checkpoint does.\n\n"
        "For real answers pass a real model, e.g. `--model Qwen/Qwen3-0.6B`, a local checkpoint directory,\n"
        "or a `.gguf` file.\n\n"
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
    directory: Path, arch: DemoArch, size: DemoSize, seed: int, env: Mapping[str, str] | None
) -> None:
    config = demo_config(arch, size, seed)
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json", demo_generation_config(arch))
    save_file(demo_tensors(config, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    flavor: Flavor = flavor_for_model_type(arch.value)
    write_tokenizer_files(directory, chat_template(flavor), eos_token=IM_END, env=env)
    (directory / "README.md").write_text(_readme(config), encoding="utf-8")
    for file in directory.iterdir():
        # Some writers create 0600 files; a checkpoint is ordinary, shareable data.
        file.chmod(0o644)


def _build_aside(
    out_dir: Path, arch: DemoArch, size: DemoSize, seed: int, env: Mapping[str, str] | None
) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_demo_files(staging, arch, size, seed, env)
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
) -> Path:
    """Write a random-weight demo checkpoint to `out_dir` (replacing an older demo there) and return it."""
    out_dir, arch, size = Path(out_dir).expanduser(), _arch(arch), _size(size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DemoError(f"bad demo seed {seed!r}: pass a non-negative integer")
    occupied = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if occupied and not is_demo_checkpoint(out_dir):
        raise DemoError(
            f"{out_dir} exists and is not a qwenkit demo checkpoint: choose a new or empty directory"
        )
    staging = _build_aside(out_dir, arch, size, seed, env)
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
