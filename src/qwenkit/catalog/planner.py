"""The memory planner: will this model, in this format, with this workload, fit this device?

Contract: plan(PlanRequest) is pure arithmetic (no I/O). It predicts the peak resident memory of the
engine running the workload: the runtime baseline (measured, see measure.py), the weights as stored
(formats.weight_layout, exact for GGUF recipes) plus llama.cpp's repacked copies, the KV cache
(KV layers × KV heads × head dim × 2 × bytes × cells; in a Gated DeltaNet hybrid only the full-attention
layers carry KV), the recurrent state of hybrids (conv + delta-rule state per linear-attention layer, f32,
one per sequence slot), llama.cpp's logits buffer (n_vocab × n_seq_max × 4)
and the compute buffer the worst step touches (a full n_batch chunk attending over a whole sequence's
context). A plan for `qwenkit serve` (PlanRequest.state_cache_mb > 0) of a hybrid on llama.cpp also
counts the server's saved-state cache in full (turn-boundary snapshots, host memory, so on a CPU only;
a GPU plan notes it). It compares that with the device's budget and returns a Plan with a verdict: fits,
fits with the listed changes (flash attention, quantized KV, fewer slots, shorter context, a smaller
state cache, smaller format), or does not fit, always with the numbers. With PlanRequest.images (llama.cpp
with a vision projector, `--mmproj`) the projector's weights (encoder parameters x its type's bytes) are
counted, with the vision encoder's compute buffer at the largest image the engine takes (mtmd keeps that
buffer once an image that large was encoded; VisionTower.compute_bytes, from measurements), and the plan
carries an ImageBudget: the image tokens of the processor's largest image and of a 1024x1024 photo, and how
many such photos one request's context holds. qwenkit's engine runs the projector on the CPU, so on a GPU
both are host memory, outside the GPU budget (a note says so). Decode speed is an estimate:
memory bandwidth divided by the bytes one step reads (active parameters for MoE). GPU figures are
estimates not checked on a GPU here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal

from qwenkit.catalog.formats import (
    KV_BYTES,
    TensorLayout,
    WeightFormat,
    repack_types,
    repacked_bytes,
    weight_layout,
)
from qwenkit.catalog.measure import RuntimeBaseline
from qwenkit.catalog.shape import ModelShape
from qwenkit.engines.llamacpp.config import EngineConfig

__all__ = [
    "GGUF_LADDER",
    "HF_LADDER",
    "SERVE_STATE_CACHE_MB",
    "Device",
    "Engine",
    "ImageBudget",
    "MemoryBreakdown",
    "Plan",
    "PlanError",
    "PlanRequest",
    "Speed",
    "Verdict",
    "plan",
]

GIB = 1024**3
MIB = 1024**2
HEADROOM = 0.10  # the estimate's tolerance: a plan fits only with this share of the budget to spare
# A described (not probed) CPU device shares its RAM with the OS and other programs: keep a quarter of it,
# at least 1.5 GiB (what a phone's OS holds) and at most 4 GiB.
CPU_OS_RESERVE = 0.25
CPU_OS_RESERVE_MIN = 3 * GIB // 2
CPU_OS_RESERVE_MAX = 4 * GIB
# Estimates for GPUs (not measurable on this machine): the CUDA context, cuBLAS workspaces and, for vLLM,
# CUDA graphs; vLLM's profiling batch for activations.
CUDA_OVERHEAD = {"llamacpp": 600 * MIB, "vllm": GIB}
VLLM_PROFILE_TOKENS = 2048
# Without a measurement (llama.cpp missing): what the baseline measured on the reference 2-core x86 box.
FALLBACK_BASELINE = RuntimeBaseline(
    115 * MIB, 120 * MIB, "not measured (llama-cpp-python missing): typical value"
)
N_CTX_PAD = 256  # llama.cpp pads each sequence's KV cells to a multiple of 256
DELTA_CHUNK = 64  # llama.cpp's chunked gated delta rule works on 64-token chunks in a prompt
LLAMA_TOKEN_DATA = 12  # sizeof(llama_token_data): the sampler's candidate array per sampled token
# What `qwenkit serve` keeps for saved sequence states unless --state-cache-mb says otherwise.
SERVE_STATE_CACHE_MB: int = EngineConfig.model_fields["state_cache_mb"].default
STATE_CACHE_FLOOR_MB = 128  # the smallest cap a suggestion offers before turning the cache off
# Bytes per vision-tower parameter in a projector GGUF (qwenkit writes f16 or f32; downloads also ship these).
MMPROJ_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
PHOTO_SIDE = 1024  # the "typical photo" an image budget is stated for

GGUF_LADDER = (
    WeightFormat.F32,
    WeightFormat.BF16,
    WeightFormat.FP16,
    WeightFormat.Q8_0,
    WeightFormat.Q6_K,
    WeightFormat.Q5_K_M,
    WeightFormat.Q4_K_M,
    WeightFormat.Q4_0,
)
HF_LADDER = (
    WeightFormat.BF16,
    WeightFormat.FP16,
    WeightFormat.FP8,
    WeightFormat.GPTQ_INT8,
    WeightFormat.AWQ_INT4,
    WeightFormat.GPTQ_INT4,
)
# Bytes per activation element in the type llama.cpp converts activations to for each weight type.
_VEC_DOT_BYTES = {
    "F32": 4.0,
    "F16": 2.0,
    "BF16": 2.0,
    "Q8_0": 34 / 32,
    "Q4_0": 34 / 32,
    "Q5_0": 34 / 32,
    "Q5_1": 36 / 32,
    "IQ4_NL": 34 / 32,
    "Q4_K": 292 / 256,
    "Q5_K": 292 / 256,
    "Q6_K": 292 / 256,
}


class PlanError(ValueError):
    """A request the planner cannot answer; the message is one line naming the fix."""


class Engine(StrEnum):
    LLAMACPP = "llamacpp"
    VLLM = "vllm"


class Verdict(StrEnum):
    FITS = "fits"
    FITS_WITH_CHANGES = "fits with changes"
    DOES_NOT_FIT = "does not fit"


@dataclass(frozen=True)
class Device:
    """Where the model runs. `available_bytes` is probed free memory; described devices leave it None."""

    kind: Literal["cpu", "cuda"]
    total_bytes: int
    available_bytes: int | None = None
    bandwidth_gbs: float | None = None
    cpu_flags: frozenset[str] | None = None
    name: str = ""

    def budget(self) -> tuple[int, str]:
        """Bytes a plan may use, and how that was worked out."""
        if self.available_bytes is not None:
            base, why = self.available_bytes, "free now"
        elif self.kind == "cpu":
            share = int(self.total_bytes * CPU_OS_RESERVE)
            reserve = min(CPU_OS_RESERVE_MAX, max(CPU_OS_RESERVE_MIN, share), self.total_bytes // 2)
            base, why = (
                self.total_bytes - reserve,
                f"{_gib(self.total_bytes)} minus {_gib(reserve)} for the OS",
            )
        else:
            base, why = self.total_bytes, f"{_gib(self.total_bytes)} of GPU memory"
        return int(base * (1 - HEADROOM)), f"{why}, less {HEADROOM:.0%} headroom"


@dataclass(frozen=True)
class PlanRequest:
    """What to plan. context is tokens per sequence; concurrency the sequences served at once."""

    shape: ModelShape
    weight_format: WeightFormat
    context: int
    concurrency: int
    device: Device
    kv_type: str = "f16"
    engine: Engine | None = None
    flash_attn: bool | None = None  # None: what the engine does (on: llama.cpp's auto, vLLM)
    n_batch: int = 512
    runtime: RuntimeBaseline = FALLBACK_BASELINE
    layout: tuple[TensorLayout, ...] | None = None  # the real tensors of a local GGUF, when planning one
    formats_allowed: frozenset[WeightFormat] | None = None  # for suggestions: formats that can be had
    # MiB a `qwenkit serve` process may keep for saved states (--state-cache-mb); 0: an engine alone.
    state_cache_mb: int = 0
    images: bool = False  # llama.cpp with the vision projector loaded (serve --mmproj)
    mmproj_type: str = "f16"

    @property
    def resolved_engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.weight_format.hf_dtype and self.device.kind == "cuda":
            return Engine.VLLM  # a 16-bit checkpoint on a GPU: vLLM; on a CPU: a 16-bit GGUF
        return Engine.LLAMACPP if self.weight_format.is_gguf else Engine.VLLM

    @property
    def resolved_flash_attn(self) -> bool:
        # llama.cpp's auto turns it on wherever it has the kernel (CPU, CUDA, Metal, Vulkan).
        return True if self.flash_attn is None else self.flash_attn

    @property
    def serves_state_cache(self) -> bool:
        """Whether the plan describes qwenkit's server keeping turn-boundary snapshots: a hybrid
        (recurrent) model on llama.cpp with a state cache, the case where the cache fills with states."""
        return self.state_cache_mb > 0 and self.shape.is_hybrid and self.resolved_engine is Engine.LLAMACPP


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes by component; `peak` is the predicted peak resident memory, `required` what must fit."""

    weights: int
    repacked: int
    kv_cache: int
    compute: int
    output: int
    runtime: int
    peak: int
    reclaimable: int
    recurrent: int = 0  # hybrid models: conv + delta-rule state of every sequence slot
    experts: int = 0  # MoE: the routed expert weights (part of `weights`), all resident
    state_cache: int = 0  # qwenkit serve on a hybrid: the saved-state cache at its bound (host memory)
    vision: int = 0  # the vision projector's weights (llama.cpp with --mmproj)
    vision_compute: int = 0  # the vision encoder's compute buffer at the largest image (kept once reached)

    @property
    def required(self) -> int:
        return self.peak - self.reclaimable


@dataclass(frozen=True)
class Speed:
    """Decode estimate from memory bandwidth: an upper bound, not a measurement."""

    bytes_per_token: int
    single_tok_s: float | None
    aggregate_tok_s: float | None
    basis: str


@dataclass(frozen=True)
class ImageBudget:
    """What images cost one request: tokens of the processor's largest image and of a 1024x1024 photo
    (factor x factor pixels per token), and how many such photos fit the per-request context."""

    factor: int
    max_image_tokens: int
    photo_tokens: int
    photos_per_request: int


# Model types whose checkpoints carry a vision tower qwenkit converts to a projector (gguf/mmproj.py).
VISION_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def _sees(shape: ModelShape) -> bool:
    return shape.encoder_params > 0 or shape.model_type.removesuffix("_text") in VISION_MODEL_TYPES


def vision_compute_bytes(shape: ModelShape) -> int:
    """The vision encoder's compute buffer for the largest image the engine takes (the processor's
    max_pixels, held to ENGINE_MAX_IMAGE_TOKENS); 0 when the tower's sizes are not known."""
    from qwenkit.media.images import VisionSpec

    if shape.vision is None:
        return 0
    spec = VisionSpec.for_projector(shape.model_type)
    return shape.vision.compute_bytes(spec.max_pixels // shape.vision.patch**2)


def image_budget(shape: ModelShape, n_ctx_seq: int) -> ImageBudget:
    """The image budget of a VL model's processor (Qwen2.5-VL: 28 px per token; Qwen3-VL/Qwen3.5: 32)."""
    from qwenkit.media.images import VisionSpec, smart_resize

    spec = VisionSpec.for_projector(shape.model_type)
    height, width = smart_resize(PHOTO_SIDE, PHOTO_SIDE, spec)
    photo = height * width // spec.factor**2
    return ImageBudget(spec.factor, spec.max_pixels // spec.factor**2, photo, n_ctx_seq // photo)


@dataclass(frozen=True)
class Change:
    """One way to make a plan fit: what changes, and the plan with it."""

    summary: str
    plan: Plan


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    engine: Engine
    flash_attn: bool
    n_ctx_seq: int
    memory: MemoryBreakdown
    budget: int
    budget_basis: str
    speed: Speed
    notes: tuple[str, ...] = ()
    verdict: Verdict = Verdict.FITS
    changes: tuple[Change, ...] = field(default=(), repr=False)
    images: ImageBudget | None = None  # set when the plan loads the vision projector

    @property
    def fits(self) -> bool:
        return self.memory.required <= self.budget

    @property
    def n_ctx(self) -> int:
        return self.n_ctx_seq * self.request.concurrency


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class _Weights:
    """What the formulas need from a tensor layout, summed once per (shape, format)."""

    total: int
    experts: int
    embed: int
    widest_row: int
    activation_bytes: float  # per element, in the type activations are converted to for the matmuls
    layout: tuple[TensorLayout, ...]

    @classmethod
    def of(cls, layout: Sequence[TensorLayout], hidden: int) -> _Weights:
        matrices = [lay for lay in layout if lay.tensor.is_matrix]
        return cls(
            total=sum(lay.nbytes for lay in layout),
            experts=sum(lay.nbytes for lay in layout if lay.tensor.experts > 1),
            embed=sum(lay.nbytes for lay in layout if lay.tensor.role == "embed"),
            widest_row=max((lay.tensor.ne0 for lay in matrices), default=hidden),
            activation_bytes=max((_VEC_DOT_BYTES.get(lay.dtype, 2.0) for lay in matrices), default=2.0),
            layout=tuple(layout),
        )


_Layouts = dict[tuple[ModelShape, WeightFormat, bool], _Weights]


def _weights(r: PlanRequest, gguf: bool, cache: _Layouts) -> _Weights:
    if r.layout is not None:
        return _Weights.of(r.layout, r.shape.hidden)
    key = (r.shape, r.weight_format, gguf)
    if key not in cache:
        cache[key] = _Weights.of(weight_layout(r.shape, r.weight_format, gguf), r.shape.hidden)
    return cache[key]


def _compute_bytes(r: PlanRequest, w: _Weights, n_ctx_seq: int, flash: bool) -> int:
    """What llama.cpp's compute buffer and work buffer touch in the worst step (CPU graph, llama.cpp).

    A chunk of T = n_batch prompt tokens attending over n_kv = n_ctx_seq cells: without flash attention
    the scores KQ (heads × n_kv × T, f32) are materialised, and the work buffer holds them again in the
    V cache's type for the KQ·V product; the KQ mask is n_kv × T. The other phase holds the feed-forward
    activations; the graph allocator reuses memory between phases, so the larger phase counts, plus the
    logits rows the engine asks for (one per sequence), plus a hybrid's DeltaNet phase (_delta_net_bytes).
    """
    s = r.shape
    t = min(r.n_batch, n_ctx_seq)
    n_kv = n_ctx_seq
    q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
    resid = 4 * t * (2 * s.hidden + q_dim + 2 * kv_dim + q_dim)  # x, norm, q, k, v, attention out
    if flash:
        attn = resid + 2 * n_kv * t  # f16 mask
        attn_work = 2 * t * q_dim
    else:
        kq = 4 * s.heads * n_kv * t
        attn = resid + kq + 4 * n_kv * t
        attn_work = int(kq * KV_BYTES[r.kv_type] / 4) if r.kv_type != "f32" else 0
    if s.is_moe:
        ffn_width = s.experts_used * s.moe_ffn + s.shared_ffn
        ffn = 4 * t * (3 * ffn_width + 2 * s.hidden + s.experts)
    else:
        ffn = 4 * t * (3 * s.ffn + 2 * s.hidden)
    work = max(attn_work, int(t * w.widest_row * w.activation_bytes))
    logits = 4 * s.vocab * min(t, r.concurrency)
    # A hybrid's DeltaNet layers touch their own buffer region: measured on the demos, their pages add to
    # the attention phase's rather than being reused by it (the scores need one block larger than any
    # the DeltaNet phase freed).
    return max(attn, ffn, logits) + _delta_net_bytes(s, t) + work


def _delta_net_bytes(s: ModelShape, t: int) -> int:
    """What a Gated DeltaNet layer's prompt step touches (f32, llama.cpp's chunked delta rule): the
    projections, the conv input (history + chunk), q/k/v and their gated copies per head (S × T × H),
    the per-chunk decay and attention matrices (chunk × T × H) and a state per chunk (H × S × S)."""
    if not s.is_hybrid:
        return 0
    key_dim, value_dim = s.linear_k_heads * s.linear_k_dim, s.linear_v_heads * s.linear_v_dim
    conv_dim = 2 * key_dim + value_dim
    padded = -(-t // DELTA_CHUNK) * DELTA_CHUNK
    heads, dim = s.linear_v_heads, s.linear_k_dim
    proj = t * (s.hidden + 2 * conv_dim + 3 * value_dim + 2 * heads)
    conv_in = (t + s.conv_kernel - 1) * conv_dim
    per_head = 8 * padded * heads * dim + 6 * padded * heads * DELTA_CHUNK
    states = (padded // DELTA_CHUNK) * 2 * heads * dim * dim
    return 4 * (proj + conv_in + per_head + states)


def _speed(r: PlanRequest, w: _Weights, kv_per_token: float, context: int) -> Speed:
    s = r.shape
    state = 2 * s.recurrent_state_bytes_per_seq()  # a hybrid reads and writes its state every step
    experts_bytes = w.experts
    dense = w.total - experts_bytes
    if not s.tied:
        dense -= w.embed  # an untied embedding is a lookup: one row per token
    one = experts_bytes * (s.experts_used / s.experts) if s.is_moe else 0
    kv_read = kv_per_token * context / 2  # on average a sequence is half way through its context
    single = dense + one + kv_read + state
    n = r.concurrency
    touched = experts_bytes * (1 - (1 - s.experts_used / s.experts) ** n) if s.is_moe else 0
    step = dense + touched + n * (kv_read + state)
    bw = r.device.bandwidth_gbs
    basis = f"estimate: {bw:.1f} GB/s memory bandwidth / bytes read per step" if bw else "no bandwidth known"
    return Speed(
        bytes_per_token=int(single),
        single_tok_s=bw * 1e9 / single if bw else None,
        aggregate_tok_s=n * bw * 1e9 / step if bw else None,
        basis=basis,
    )


def _memory(r: PlanRequest, cache: _Layouts) -> tuple[Engine, bool, int, MemoryBreakdown, Speed]:
    engine, flash = r.resolved_engine, r.resolved_flash_attn
    s = r.shape
    fmt = r.weight_format
    if (engine is Engine.LLAMACPP and not fmt.is_gguf) or (
        engine is Engine.VLLM and fmt.is_gguf and not fmt.hf_dtype
    ):
        fix = (
            "a GGUF format such as q4_k_m" if engine is Engine.LLAMACPP else "bf16, fp8 or awq-int4 on a GPU"
        )
        raise PlanError(f"{engine.value} does not run {fmt.value} weights: use {fix}")
    if engine is Engine.VLLM and r.device.kind == "cpu" and not fmt.hf_dtype:
        raise PlanError(f"{fmt.value} weights run on CUDA GPUs (vLLM): use --device cuda, or q4_k_m on a CPU")
    if r.kv_type not in KV_BYTES:
        raise PlanError(f"unknown KV cache type {r.kv_type!r}: use one of {', '.join(KV_BYTES)}")
    if engine is Engine.LLAMACPP and r.kv_type == "fp8":
        raise PlanError("llama.cpp has no fp8 KV cache: use --kv q8_0")
    if engine is Engine.LLAMACPP and r.kv_type == "q8_0" and r.flash_attn is False:
        raise PlanError("llama.cpp quantizes the V cache only with flash attention: drop --flash-attn off")
    if engine is Engine.VLLM and r.kv_type == "q8_0":
        raise PlanError("vLLM's quantized KV cache is fp8: use --kv fp8")
    if r.images and (engine is not Engine.LLAMACPP or not _sees(s)):
        why = "qwenkit plans images on llama.cpp only" if _sees(s) else f"{s.name} has no vision tower"
        raise PlanError(f"--images: {why}; drop --images")
    if r.images and r.mmproj_type not in MMPROJ_BYTES:
        raise PlanError(f"unknown projector type {r.mmproj_type!r}: use one of {', '.join(MMPROJ_BYTES)}")
    w = _weights(r, engine is Engine.LLAMACPP, cache)
    weights = w.total
    vision = int(s.encoder_params * MMPROJ_BYTES[r.mmproj_type]) if r.images else 0
    vision_compute = vision_compute_bytes(s) if r.images else 0
    if engine is Engine.LLAMACPP:
        n_ctx_seq = _pad(r.context, N_CTX_PAD)
        cells = n_ctx_seq * r.concurrency
    else:
        n_ctx_seq = _pad(r.context, 16)  # vLLM allocates KV in 16-token blocks
        cells = n_ctx_seq * r.concurrency
        weights += 2 * s.encoder_params  # vision/audio encoders stay in 16-bit in every official repo
    kv_per_token = s.kv_bytes_per_token(KV_BYTES[r.kv_type])
    kv = int(kv_per_token * cells)
    # llama.cpp and vLLM keep one recurrent state (f32) per sequence slot, whatever its length.
    recurrent = s.recurrent_state_bytes_per_seq() * r.concurrency
    speed = _speed(r, w, kv_per_token, n_ctx_seq)
    if engine is Engine.LLAMACPP:
        compute = _compute_bytes(r, w, n_ctx_seq, flash)
        output = 4 * s.vocab * r.concurrency
        on_cpu = r.device.kind == "cpu"
        repacked = repacked_bytes(w.layout, repack_types(r.device.cpu_flags)) if on_cpu else 0
        # Saved states live in host memory: they share a CPU's budget, not a GPU's (see _notes).
        state_cache = r.state_cache_mb * MIB if on_cpu and r.serves_state_cache else 0
        if on_cpu:
            run = (
                r.runtime.steady_bytes
                + weights
                + repacked
                + kv
                + recurrent
                + output
                + compute
                + s.vocab * LLAMA_TOKEN_DATA
                + state_cache
                + vision
                + vision_compute
            )
            load = r.runtime.peak_bytes + weights + repacked + vision
            runtime = r.runtime.steady_bytes
        else:
            # The projector and its encoder run on the CPU (mtmd without GPU): host memory, see _notes.
            vision = vision_compute = 0
            runtime = CUDA_OVERHEAD["llamacpp"]
            run = load = runtime + weights + kv + recurrent + output + compute
        peak = max(run, load)
        # The file pages a repacked tensor was read from stay mapped but are never touched again.
        memory = MemoryBreakdown(
            weights,
            repacked,
            kv,
            compute,
            output,
            runtime,
            peak,
            repacked,
            recurrent,
            w.experts,
            state_cache,
            vision=vision,
            vision_compute=vision_compute,
        )
    else:
        tokens = min(VLLM_PROFILE_TOKENS, cells)
        width = (s.experts_used * s.moe_ffn + s.shared_ffn) if s.is_moe else s.ffn
        compute = 2 * tokens * (6 * s.hidden + 3 * width) + 4 * s.vocab * r.concurrency
        runtime = CUDA_OVERHEAD["vllm"] if r.device.kind == "cuda" else FALLBACK_BASELINE.steady_bytes
        peak = runtime + weights + kv + recurrent + compute
        memory = MemoryBreakdown(weights, 0, kv, compute, 0, runtime, peak, 0, recurrent, w.experts)
    return engine, flash, n_ctx_seq, memory, speed


def _notes(r: PlanRequest, engine: Engine) -> list[str]:
    s, notes = r.shape, []
    if s.context_native and r.context > s.context_native:
        if s.context_extended and r.context <= s.context_extended:
            factor = r.context / s.context_native
            notes.append(
                f"{r.context} tokens is past the native {s.context_native}: enable YaRN rope scaling "
                f"(factor {math.ceil(factor)}; Qwen advises it only when long inputs are expected)"
            )
        else:
            notes.append(
                f"{r.context} tokens exceeds the model's maximum context ({s.max_context}): output past it "
                "is not supported by the model"
            )
    if s.is_hybrid:
        per_seq = s.recurrent_state_bytes_per_seq()
        notes.append(
            f"hybrid (Gated DeltaNet): KV cache on {s.kv_layers} of {s.layers} layers; each sequence also "
            f"keeps a fixed {per_seq / MIB:.1f} MiB recurrent state ({s.linear_layers} linear-attention "
            "layers, f32), whatever its length"
        )
    if r.serves_state_cache:
        where = "counted above" if r.device.kind == "cpu" else "host memory, outside the GPU budget"
        notes.append(
            f"qwenkit serve keeps up to {r.state_cache_mb} MiB of saved conversation states "
            f"(--state-cache-mb; {where}) so each turn prefills only its new tokens; "
            "--state-cache-mb 0 frees it, but every turn then re-reads its whole history"
        )
    if s.is_moe:
        notes.append(
            f"MoE: memory holds all {s.params_total / 1e9:.1f}B parameters; each token reads "
            f"{s.params_active / 1e9:.1f}B (the speed estimate uses the active ones)"
        )
    if engine is Engine.LLAMACPP and r.kv_type == "q8_0":
        notes.append(
            "a q8_0 KV cache needs flash attention in llama.cpp: "
            "EngineConfig(kv_type='q8_0', flash_attn=True)"
        )
    if engine is Engine.LLAMACPP and r.images:
        b = image_budget(s, _pad(r.context, N_CTX_PAD))
        if not s.encoder_params:
            notes.append(
                f"images: the catalog has no vision-tower size for {s.name}: add its projector file's size "
                "(mmproj-*.gguf) to the memory above"
            )
        elif s.vision is None:
            notes.append(
                f"images: {s.name}'s vision tower ({s.encoder_params / 1e6:.0f}M parameters) is its "
                "published total less the text tower, and its encoder's compute buffer is not counted (its "
                "sizes are not catalogued)"
            )
        projector = s.encoder_params * MMPROJ_BYTES[r.mmproj_type]
        where = (
            "counted above"
            if r.device.kind == "cpu"
            else f"{projector / MIB:.0f} MiB of host memory outside the GPU budget (it runs on the CPU)"
        )
        encoder = ""
        if s.vision is not None:
            photo = s.vision.compute_bytes(b.photo_tokens * s.vision.merge**2)
            encoder = (
                f", and so is its encoder's compute buffer at the largest image, "
                f"{vision_compute_bytes(s) / MIB:.0f} MiB (llama.cpp keeps the largest it needed; a photo "
                f"needs {photo / MIB:.0f} MiB)"
            )
        notes.append(
            f"images: the vision projector ({r.mmproj_type}) is {where}{encoder}; a "
            f"{PHOTO_SIDE}x{PHOTO_SIDE} photo is {b.photo_tokens} prompt tokens ({b.factor}x{b.factor} "
            f"pixels each), the largest image {b.max_image_tokens}; one request's context holds "
            f"{b.photos_per_request} such photos beside its text"
        )
    elif engine is Engine.LLAMACPP and s.encoder_params:
        notes.append(
            "text only: the vision tower is not loaded; plan with --images for `qwenkit serve --mmproj`"
        )
    if engine is Engine.VLLM:
        notes.append("vLLM engine: GPU figures are estimates (CUDA context, activations), not measured here")
    return notes


def _build(r: PlanRequest, cache: _Layouts) -> Plan:
    engine, flash, n_ctx_seq, memory, speed = _memory(r, cache)
    budget, basis = r.device.budget()
    images = image_budget(r.shape, n_ctx_seq) if r.images else None
    return Plan(
        r, engine, flash, n_ctx_seq, memory, budget, basis, speed, tuple(_notes(r, engine)), images=images
    )


def _halvings(value: int, floor: int) -> list[int]:
    out, v = [], value
    while v // 2 >= floor:
        v //= 2
        out.append(v)
    return out


def _alternatives(r: PlanRequest) -> Iterable[tuple[float, str, PlanRequest]]:
    """Changes that trade the least first: (cost, summary, request)."""
    engine = r.resolved_engine
    if engine is Engine.LLAMACPP and not r.resolved_flash_attn:
        yield 0.0, "turn on flash attention (no attention-score matrix)", replace(r, flash_attn=True)
    quant_kv = "q8_0" if engine is Engine.LLAMACPP else "fp8"
    if r.kv_type not in (quant_kv, "fp8"):
        yield 0.1, f"quantize the KV cache to {quant_kv}", replace(r, kv_type=quant_kv, flash_attn=None)
    for n in _halvings(r.concurrency, 1):
        yield (
            0.3 * math.log2(r.concurrency / n),
            f"serve {n} sequences at once instead of {r.concurrency}",
            replace(r, concurrency=n),
        )
    for c in _halvings(r.context, 512):
        yield 0.3 * math.log2(r.context / c), f"shorten the context to {c} tokens", replace(r, context=c)
    if r.serves_state_cache and r.device.kind == "cpu":
        # A smaller cache keeps fewer conversations' snapshots; none re-reads every history each turn.
        for mb in _halvings(r.state_cache_mb, STATE_CACHE_FLOOR_MB):
            summary = f"cap the state cache at {mb} MiB (--state-cache-mb {mb})"
            yield 0.1 * math.log2(r.state_cache_mb / mb), summary, replace(r, state_cache_mb=mb)
        yield 0.5, "turn off the state cache (--state-cache-mb 0)", replace(r, state_cache_mb=0)
    ladder = GGUF_LADDER if r.resolved_engine is Engine.LLAMACPP else HF_LADDER
    if r.layout is None and r.weight_format in ladder:
        below = ladder[ladder.index(r.weight_format) + 1 :]
        for i, fmt in enumerate(below, 1):
            if _can_use(r, fmt):
                yield (
                    0.25 * i,
                    f"use {fmt.value} weights instead of {r.weight_format.value}",
                    replace(r, weight_format=fmt),
                )


def _can_use(r: PlanRequest, fmt: WeightFormat) -> bool:
    """Whether a suggestion may switch `r` to `fmt`: known to exist, and runnable by its engine there."""
    if r.formats_allowed is not None and fmt not in r.formats_allowed:
        return False
    if r.resolved_engine is Engine.LLAMACPP:
        return fmt.is_gguf
    # vLLM runs checkpoints (not GGUF-only formats); its CPU backend is planned for 16-bit ones only.
    return (fmt.hf_dtype or not fmt.is_gguf) and (r.device.kind == "cuda" or fmt.hf_dtype)


def plan(request: PlanRequest, *, suggest: bool = True, cache: _Layouts | None = None) -> Plan:
    """Plan `request`; when it does not fit (and `suggest`), find the cheapest changes that make it fit.

    `cache` (a dict) may be shared between calls to reuse tensor layouts of the same shape and format.
    """
    if request.context < 64 or request.concurrency < 1:
        raise PlanError("context must be at least 64 tokens and concurrency at least 1")
    if request.state_cache_mb < 0:
        raise PlanError("the state cache cannot be negative: use --state-cache-mb 0 to turn it off")
    cache = {} if cache is None else cache
    base = _build(request, cache)
    if not suggest:
        return base if base.fits else replace(base, verdict=Verdict.DOES_NOT_FIT)
    if base.fits:
        return replace(base, notes=base.notes + _flash_hint(request, base, cache))
    singles: list[tuple[float, Change]] = []
    for cost, summary, alt in _alternatives(request):
        p = _build(alt, cache)
        if p.fits:
            singles.append((cost, Change(summary, p)))
    singles.sort(key=lambda c: c[0])
    changes = _dedupe(singles)[:4]
    if not changes:
        combined = _combine(request, cache)
        if combined is not None:
            changes = [combined]
    if changes:
        return replace(base, verdict=Verdict.FITS_WITH_CHANGES, changes=tuple(changes))
    floor = _build(_floor(request), cache)
    note = (
        f"even at {floor.request.weight_format.value} with a {floor.request.kv_type} KV cache, "
        f"1 sequence and {floor.request.context} tokens"
        + (" (no state cache)" if request.serves_state_cache else "")
        + f" it needs {floor.memory.required / GIB:.1f} GiB"
    )
    return replace(base, verdict=Verdict.DOES_NOT_FIT, notes=(*base.notes, note))


def _floor(r: PlanRequest) -> PlanRequest:
    """The smallest configuration the levers reach: a lower bound to report when nothing fits."""
    ladder = GGUF_LADDER if r.resolved_engine is Engine.LLAMACPP else HF_LADDER
    fmt = r.weight_format
    if r.layout is None and fmt in ladder:
        allowed = [f for f in ladder[ladder.index(fmt) :] if _can_use(r, f)]
        fmt = allowed[-1] if allowed else fmt
    kv = "q8_0" if r.resolved_engine is Engine.LLAMACPP else "fp8"
    return replace(
        r,
        weight_format=fmt,
        kv_type=kv,
        flash_attn=None,
        concurrency=1,
        context=min(r.context, 2048),
        state_cache_mb=0,
    )


def _flash_hint(r: PlanRequest, base: Plan, cache: _Layouts) -> tuple[str, ...]:
    if base.engine is not Engine.LLAMACPP or base.flash_attn:
        return ()
    saved = base.memory.required - _build(replace(r, flash_attn=True), cache).memory.required
    if saved < 256 * MIB:
        return ()
    return (
        f"flash attention would save {saved / GIB:.1f} GiB of compute buffer (EngineConfig(flash_attn=True))",
    )


def _dedupe(found: list[tuple[float, Change]]) -> list[Change]:
    # One change per lever (the cheapest that fits): "context 8192" rather than also 4096 and 2048.
    seen: set[str] = set()
    out = []
    for _, change in found:
        lever = change.summary.split(" ")[0] + change.summary.split(" ")[1]
        if lever not in seen:
            seen.add(lever)
            out.append(change)
    return out


def _combine(r: PlanRequest, cache: _Layouts) -> Change | None:
    """Apply the levers cumulatively (cheapest first) until the plan fits."""
    steps: list[str] = []
    current = r
    for _ in range(12):
        options = list(_alternatives(current))
        if not options:
            return None
        before = _build(current, cache).memory.required
        # Take the lever that saves the most memory per unit of cost.
        scored = [
            ((before - _build(alt, cache).memory.required) / (cost + 0.05), summary, alt)
            for cost, summary, alt in options
        ]
        _, summary, current = max(scored, key=lambda item: item[0])
        steps.append(summary)
        p = _build(current, cache)
        if p.fits:
            return Change("; ".join(steps), p)
    return None
