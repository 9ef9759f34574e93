"""Weight formats and what each costs in bytes, tensor by tensor.

Contract: WeightFormat names the formats the planner knows. weight_layout() gives every tensor of a
ModelShape its storage type and size: for GGUF formats it follows llama.cpp's own rules (qwenkit's
converter for f32/f16/bf16/q8_0, llama_model_quantize's recipe for the k-quants and q4_0, including
the fallback types for rows that do not fill a block); for Hugging Face formats (AWQ, GPTQ, FP8) it
follows their published layouts. repacked_bytes() is the extra copy llama.cpp's CPU backend makes of
weights it re-lays out for its SIMD kernels (ggml-cpu/repack.cpp). Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from qwenkit.catalog.shape import ModelShape, TensorSpec

__all__ = [
    "GGML_BLOCKS",
    "KV_BYTES",
    "TensorLayout",
    "WeightFormat",
    "parse_format",
    "repack_types",
    "repacked_bytes",
    "weight_layout",
]

# ggml block geometry (ggml-common.h): type → (elements per block, bytes per block).
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "IQ4_NL": (32, 18),
}
# Bytes per KV element: llama.cpp cache types (q8_0 is 34 bytes per 32) and vLLM's fp8 cache.
KV_BYTES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "fp8": 1.0}


class WeightFormat(StrEnum):
    F32 = "f32"
    BF16 = "bf16"
    FP16 = "fp16"
    Q8_0 = "q8_0"
    Q6_K = "q6_k"
    Q5_K_M = "q5_k_m"
    Q4_K_M = "q4_k_m"
    Q4_0 = "q4_0"
    FP8 = "fp8"
    AWQ_INT4 = "awq-int4"
    GPTQ_INT4 = "gptq-int4"
    GPTQ_INT8 = "gptq-int8"

    @property
    def is_gguf(self) -> bool:
        """Runs on llama.cpp (a GGUF file)."""
        return self in _GGUF_TYPE

    @property
    def catalog_key(self) -> str:
        """The key of the catalog's `quantized` map that holds an official repo in this format."""
        if self.is_gguf:
            return "gguf"
        return {WeightFormat.AWQ_INT4: "awq"}.get(self, self.value)

    @property
    def hf_dtype(self) -> bool:
        """A plain checkpoint dtype (the model's own repo, no quantized repo needed)."""
        return self in (WeightFormat.BF16, WeightFormat.FP16)


_ALIASES = {"f16": "fp16", "float16": "fp16", "bfloat16": "bf16", "awq": "awq-int4", "gptq": "gptq-int4"}
# The GGUF type llama.cpp's recipe starts from for each format (llama_ftype's "MOSTLY_" type).
_GGUF_TYPE: dict[WeightFormat, str] = {
    WeightFormat.F32: "F32",
    WeightFormat.BF16: "BF16",
    WeightFormat.FP16: "F16",
    WeightFormat.Q8_0: "Q8_0",
    WeightFormat.Q6_K: "Q6_K",
    WeightFormat.Q5_K_M: "Q5_K",
    WeightFormat.Q4_K_M: "Q4_K",
    WeightFormat.Q4_0: "Q4_0",
}
# llama.cpp's fallback when a row is not a whole number of 256-element blocks (llama-quant.cpp).
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LINEAR_ROLES = {
    "linear_gate",
    "linear_out",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "ffn_gate_exps",
    "ffn_up_exps",
    "ffn_down_exps",
    "ffn_gate_shexp",
    "ffn_up_shexp",
    "ffn_down_shexp",
}
GROUP = 128  # AWQ/GPTQ group size and FP8 block size of Qwen's official quantized repos


def parse_format(text: str) -> WeightFormat:
    """A WeightFormat from user text (case-insensitive; f16, awq and gptq are accepted aliases)."""
    key = text.strip().lower().replace("_int", "-int")
    key = _ALIASES.get(key, key)
    try:
        return WeightFormat(key)
    except ValueError:
        names = ", ".join(f.value for f in WeightFormat)
        raise ValueError(f"unknown weight format {text!r}: use one of {names}") from None


@dataclass(frozen=True)
class TensorLayout:
    """One tensor as stored: `dtype` is a ggml type name for GGUF, a short tag otherwise."""

    tensor: TensorSpec
    dtype: str
    nbytes: int


def _use_more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp: the first and last eighth of the layers, and every third one between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _ggml_bytes(t: TensorSpec, dtype: str) -> int:
    per_block, block_bytes = GGML_BLOCKS[dtype]
    return t.rows * (t.ne0 // per_block) * block_bytes


def _gguf_types(shape: ModelShape, fmt: WeightFormat) -> list[tuple[TensorSpec, str]]:
    base = _GGUF_TYPE[fmt]
    quantizing = fmt not in (WeightFormat.F32, WeightFormat.BF16, WeightFormat.FP16)
    tensors = shape.tensors()
    # llama-quant.cpp treats a fused qkv (first-generation Qwen, Gated DeltaNet layers) as an attn_v.
    n_v = sum(1 for t in tensors if t.role in ("attn_v", "attn_qkv"))
    # MoE recipes index ffn_down by the block number in the name, out of n_layer (shared experts too).
    n_down = shape.layers if shape.is_moe else sum(1 for t in tensors if "ffn_down" in t.role)
    i_v = i_down = 0
    eight_experts = quantizing and shape.experts == 8
    # llama.cpp sizes qwen2 models by layer count; 80 layers is its "70B" type (Qwen2/2.5-72B).
    seventy_b = shape.model_type == "qwen2" and shape.layers == 80
    out: list[tuple[TensorSpec, str]] = []
    for t in tensors:
        if not t.is_matrix or t.role == "router":
            out.append((t, "F32"))  # norms, biases and routers stay f32 in every recipe
            continue
        dtype = base
        if quantizing and (t.role == "output" or (t.role == "embed" and shape.tied)):
            if t.ne0 % GGML_BLOCKS[base][0]:
                dtype = "Q8_0"
            elif base != "Q8_0":
                dtype = "Q6_K"
        elif t.role in ("attn_v", "attn_qkv"):
            if fmt in (WeightFormat.Q4_K_M, WeightFormat.Q5_K_M) and _use_more_bits(i_v, n_v):
                dtype = "Q6_K"
            if seventy_b and dtype == "Q4_K":
                dtype = "Q5_K"  # llama.cpp's 70B rule: attn_v is 8× smaller than attn_q there
            if eight_experts:
                dtype = "Q8_0"  # llama.cpp's rule for 8-expert models (written for Mixtral)
            i_v += 1
        elif t.role == "attn_k" and eight_experts:
            dtype = "Q8_0"
        elif t.role == "attn_output" and eight_experts and fmt is WeightFormat.Q4_K_M:
            dtype = "Q5_K"
        elif "ffn_down" in t.role:
            # MoE recipes index by the block number in the name; dense ones by a running count.
            i = t.layer if shape.is_moe and t.layer is not None else i_down
            if fmt in (WeightFormat.Q4_K_M, WeightFormat.Q5_K_M) and _use_more_bits(i, n_down):
                dtype = "Q6_K"
            i_down += 1
        if t.ne0 % GGML_BLOCKS[dtype][0]:
            dtype = _FALLBACK.get(dtype, "F16")
            if t.ne0 % GGML_BLOCKS[dtype][0]:
                dtype = "F16"
        out.append((t, dtype))
    return out


def _hf_layout(shape: ModelShape, fmt: WeightFormat) -> list[TensorLayout]:
    out = []
    for t in shape.tensors():
        linear = t.role in _LINEAR_ROLES
        if fmt in (WeightFormat.AWQ_INT4, WeightFormat.GPTQ_INT4) and linear:
            # 4-bit weights, an fp16 scale and a 4-bit zero point per group of 128 inputs.
            per_weight, tag = 0.5 + 2.5 / GROUP, "int4"
            extra = 4 * t.ne0 * t.experts if fmt is WeightFormat.GPTQ_INT4 else 0  # GPTQ's g_idx
        elif fmt is WeightFormat.GPTQ_INT8 and linear:
            per_weight, tag, extra = 1 + 3 / GROUP, "int8", 4 * t.ne0 * t.experts
        elif fmt is WeightFormat.FP8 and linear:
            per_weight, tag, extra = 1 + 4 / (GROUP * GROUP), "fp8", 0  # one f32 scale per 128×128 block
        else:
            per_weight, tag, extra = 2.0, "bf16" if fmt is not WeightFormat.FP16 else "fp16", 0
        out.append(TensorLayout(t, tag, round(t.elements * per_weight) + extra))
    return out


def weight_layout(shape: ModelShape, fmt: WeightFormat, gguf: bool | None = None) -> list[TensorLayout]:
    """Every text tensor with its stored type and bytes (encoders are counted by the planner at 16 bits).

    `gguf` says whether a 16-bit format is stored as a GGUF (norms in f32) or a checkpoint (all 16-bit);
    by default GGUF for every format llama.cpp can run.
    """
    if fmt.is_gguf if gguf is None else gguf:
        return [TensorLayout(t, dtype, _ggml_bytes(t, dtype)) for t, dtype in _gguf_types(shape, fmt)]
    return _hf_layout(shape, fmt)


def repack_types(cpu_flags: Iterable[str] | None) -> frozenset[str]:
    """GGUF types llama.cpp's CPU backend copies into an interleaved layout on this CPU.

    From ggml-cpu/repack.cpp: x86 with AVX2 repacks Q4_0, Q4_K and IQ4_NL; ARM with dot-product or
    int8-matmul extensions also Q8_0. Unknown flags (a device described, not probed) assume the largest
    set, so the plan errs on the side of more memory.
    """
    if cpu_flags is None:
        return frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q8_0"})
    flags = {f.lower() for f in cpu_flags}
    if flags & {"avx2", "avx512f"}:
        return frozenset({"Q4_0", "Q4_K", "IQ4_NL"})
    if flags & {"asimddp", "dotprod", "i8mm"}:
        return frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q8_0"})
    return frozenset()


def repacked_bytes(layout: Iterable[TensorLayout], types: frozenset[str]) -> int:
    """Bytes of the repacked copy: matrices (not the embedding lookup) of a repackable type, 8-row aligned."""
    return sum(
        lay.nbytes
        for lay in layout
        if lay.dtype in types
        and lay.tensor.role not in ("embed", "norm", "bias", "router")
        and (lay.tensor.rows // lay.tensor.experts) % 8 == 0
    )
