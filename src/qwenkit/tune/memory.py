"""Training memory, planned before anything loads: weights, LoRA state, activations, runtime.

Contract: estimate_training(config_json, batch, max_len, rank, targets, qlora) returns a TrainingMemory
breakdown in bytes, from the checkpoint's config.json alone (catalog.shape.ModelShape gives the tensors).
CPU training holds the weights in float32 (QLoRA: 4-bit NF4 plus scales); each LoRA parameter costs 16 bytes
(fp32 value, grad, Adam's two moments); activations are what autograd keeps per token (every layer's
inputs, q/k/v, attention output, the MLP's intermediate tensors) plus the float32 logits and their softmax
and gradient over the whole vocabulary at the positions that carry loss (target_share of batch × max_len
tokens: the trainer computes the LM head only there; packing fills rows to max_len); the
runtime is the measured resident size of Python + torch + transformers + peft + TRL. check_fits() raises
MemoryPlanError naming a change (smaller --batch-size / --max-len) when the total exceeds what is available.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenkit.catalog.shape import ModelShape

# Resident size of the interpreter with torch, transformers, peft, trl and datasets imported (468 MiB
# measured, CPU torch 2.13 + transformers 5.24) plus the trainer's own state.
RUNTIME_BYTES = 500 * 2**20
LOGIT_COPIES = 3  # the kept logits, their log-softmax, and its gradient (all float32)
TARGET_ROLES = {
    "q_proj": ("attn_q",),
    "k_proj": ("attn_k",),
    "v_proj": ("attn_v",),
    "o_proj": ("attn_output",),
    "gate_proj": ("ffn_gate", "ffn_gate_shexp"),
    "up_proj": ("ffn_up", "ffn_up_shexp"),
    "down_proj": ("ffn_down", "ffn_down_shexp"),
}


class MemoryPlanError(ValueError):
    """A run that would not fit in memory; the message names a change that fits."""


@dataclass(frozen=True)
class TrainingMemory:
    weights: int
    lora: int
    activations: int
    logits: int
    runtime: int
    lora_params: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.logits + self.runtime

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "lora": self.lora,
            "activations": self.activations,
            "logits": self.logits,
            "runtime": self.runtime,
            "total": self.total,
        }


def lora_params(shape: ModelShape, rank: int, targets: Sequence[str]) -> int:
    """Trainable LoRA parameters: rank × (in + out) for every targeted dense matrix."""
    roles = {r for t in targets for r in TARGET_ROLES.get(t, ())}
    n = sum(rank * (t.ne0 + t.rows) for t in shape.tensors() if t.role in roles and t.experts == 1)
    # lm_head is one (vocab × hidden) matrix whether or not the checkpoint ties it to the embedding.
    return n + (rank * (shape.hidden + shape.vocab) if "lm_head" in targets else 0)


def estimate_training(
    config: Mapping[str, Any],
    *,
    batch: int,
    max_len: int,
    rank: int,
    targets: Sequence[str],
    qlora: bool = False,
    target_share: float = 1.0,
) -> TrainingMemory:
    """The peak resident memory of a LoRA run (see the module docstring)."""
    shape = ModelShape.from_config(config)
    params = shape.text_params
    weights = int(params * (0.5 + 4 / 64)) if qlora else params * 4
    n_lora = lora_params(shape, rank, targets)
    tokens = batch * max_len
    ffn = shape.moe_ffn * shape.experts_used if shape.is_moe else shape.ffn
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    per_layer = 6 * shape.hidden + 2 * q + 2 * kv + 4 * ffn + 2 * rank * len(targets)
    activations = tokens * shape.layers * per_layer * 4
    logits = int(tokens * min(max(target_share, 0.0), 1.0) * shape.vocab * 4 * LOGIT_COPIES)
    return TrainingMemory(weights, n_lora * 16, activations, logits, RUNTIME_BYTES, n_lora)


def check_fits(memory: TrainingMemory, available: int | None, *, batch: int, max_len: int) -> None:
    """Raise MemoryPlanError when the run needs more than is available, with a change that would fit."""
    if available is None or memory.total <= available:
        return
    gib = 2**30
    per_token = (memory.activations + memory.logits) / (batch * max_len)
    fixed = memory.total - memory.activations - memory.logits
    room_tokens = int((available - fixed) / per_token) if available > fixed else 0
    if room_tokens >= max_len:
        hint = f"use --batch-size {max(1, room_tokens // max_len)} (or a smaller --max-len)"
    elif room_tokens >= 64:
        hint = f"use --batch-size 1 --max-len {room_tokens}"
    else:
        hint = "the weights alone do not fit: use --qlora on a CUDA GPU or a smaller model"
    raise MemoryPlanError(
        f"training needs about {memory.total / gib:.1f} GiB but {available / gib:.1f} GiB is available: "
        f"{hint}"
    )
