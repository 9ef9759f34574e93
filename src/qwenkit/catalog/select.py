"""`qwenkit select`: which Qwen, in which format and on which engine, for this task on this device.

Contract: select_models() plans every open-weights catalog model that can serve the task (its modalities
and its family's policy fit) in every format it can run in on the device, keeps the configurations that
fit with the requested context and concurrency (turning on flash attention, a quantized KV cache or,
for a served hybrid, a smaller saved-state cache if that is all it takes), and ranks one configuration
per model. Ranking policy, on top of the catalog's POLICY data: quality = fit(task) × log2(1 +
quality_scale × size) × fidelity(format), where size is the total parameter count in billions for dense
models and √(total × active) for MoE; "latency" multiplies quality by √(single-stream decode tok/s),
"throughput" by √(aggregate tok/s at the requested concurrency) (both bandwidth estimates; relative
bytes per token when the bandwidth is unknown).
Each recommendation carries the planner's numbers, a one-line reason from the catalog and the command;
the plans describe that command's server, so a hybrid's saved-state cache (--state-cache-mb) is counted.
Natively multimodal Qwen3.5+ models run their text tower on llama.cpp for text tasks (vision skipped);
entries whose dimensions the catalog does not confirm are left out (they cannot be planned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from qwenkit.catalog.formats import WeightFormat
from qwenkit.catalog.measure import RuntimeBaseline
from qwenkit.catalog.planner import (
    FALLBACK_BASELINE,
    SERVE_STATE_CACHE_MB,
    Device,
    Engine,
    Plan,
    PlanRequest,
    plan,
)
from qwenkit.catalog.schema import TASKS, Catalog, Entry
from qwenkit.catalog.shape import ShapeError

__all__ = [
    "TEXT_TOWER_TYPES",
    "Preference",
    "Recommendation",
    "SelectRequest",
    "run_command",
    "select_models",
]

Preference = Literal["quality", "latency", "throughput"]
# Text models qwenkit's llama.cpp engine (and converter) can run.
_LLAMACPP_TYPES = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe"}
# Natively multimodal families whose text tower the llama.cpp engine runs on its own (vision skipped).
TEXT_TOWER_TYPES = frozenset({"qwen3_5", "qwen3_5_moe"})
CPU_GGUF_FORMATS = (
    WeightFormat.Q8_0,
    WeightFormat.Q6_K,
    WeightFormat.Q5_K_M,
    WeightFormat.Q4_K_M,
    WeightFormat.Q4_0,
)
_NEEDS = {"vision": "image", "audio": "audio"}
# A served hybrid that fits only with fewer saved conversations is offered with this cache (MiB).
SMALL_STATE_CACHE_MB = 256


@dataclass(frozen=True)
class SelectRequest:
    task: str
    device: Device
    context: int = 4096
    concurrency: int = 1
    prefer: Preference = "quality"
    runtime: RuntimeBaseline = FALLBACK_BASELINE
    top: int = 5
    state_cache_mb: int = SERVE_STATE_CACHE_MB  # what the recommended `qwenkit serve` keeps for saved states

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.prefer not in ("quality", "latency", "throughput"):
            raise ValueError(f"unknown preference {self.prefer!r}: use quality, latency or throughput")


@dataclass(frozen=True)
class Recommendation:
    entry: Entry
    plan: Plan
    quality: float
    score: float
    reason: str
    adjustments: tuple[str, ...]
    command: str
    download: str

    @property
    def weight_format(self) -> WeightFormat:
        return self.plan.request.weight_format

    @property
    def engine(self) -> Engine:
        return self.plan.engine


def _size_b(entry: Entry) -> float:
    shape = entry.shape()
    total = shape.params_total / 1e9
    return math.sqrt(total * shape.params_active / 1e9) if shape.is_moe else total


def _formats(entry: Entry, device: Device, task: str) -> list[tuple[WeightFormat, Engine]]:
    """The (format, engine) pairs this entry can run in on the device for the task."""
    text_only = entry.modalities == ["text"]
    arch = entry.model.arch
    text_task = task not in _NEEDS
    gguf_ok = (
        (text_only or (text_task and arch is not None and arch.type in TEXT_TOWER_TYPES))
        and entry.family.supported_by_qwenkit
        and arch is not None
        and arch.type in _LLAMACPP_TYPES
    )
    out: list[tuple[WeightFormat, Engine]] = []
    if device.kind == "cuda":
        out.append((WeightFormat.BF16, Engine.VLLM))
        for fmt in (WeightFormat.FP8, WeightFormat.GPTQ_INT8, WeightFormat.AWQ_INT4, WeightFormat.GPTQ_INT4):
            if fmt.catalog_key in entry.model.quantized:
                out.append((fmt, Engine.VLLM))
    if gguf_ok:
        out.extend((fmt, Engine.LLAMACPP) for fmt in CPU_GGUF_FORMATS)
    elif device.kind == "cpu" and not text_only:
        out.append((WeightFormat.BF16, Engine.VLLM))  # vision/audio on a CPU: vLLM's CPU backend in bf16
    return out


def fitting_plan(base: PlanRequest, cache: dict) -> tuple[Plan, tuple[str, ...]] | None:
    """The plan as asked, else with flash attention, else with a quantized KV cache (context kept), else
    (a served hybrid on a CPU) also with the saved-state cache capped at SMALL_STATE_CACHE_MB."""
    tries = [(base, ())]
    if base.resolved_engine is Engine.LLAMACPP:
        tries.append((replace(base, flash_attn=True), ("flash attention on",)))
        quantized = replace(base, kv_type="q8_0", flash_attn=True)
        tries.append((quantized, ("KV cache q8_0 + flash attention",)))
        shrinkable = base.serves_state_cache and base.device.kind == "cpu"
        if shrinkable and base.state_cache_mb > SMALL_STATE_CACHE_MB:
            capped = replace(quantized, state_cache_mb=SMALL_STATE_CACHE_MB)
            tries.append(
                (capped, ("KV cache q8_0 + flash attention", f"state cache {SMALL_STATE_CACHE_MB} MiB"))
            )
    else:
        tries.append((replace(base, kv_type="fp8"), ("KV cache fp8",)))
    for request, adjustments in tries:
        p = plan(request, suggest=False, cache=cache)
        if p.fits:
            return p, adjustments
    return None


def _download(entry: Entry, p: Plan) -> str:
    quant, fmt = entry.model.quantized, p.request.weight_format
    if p.engine is Engine.LLAMACPP and "gguf" in quant:
        return f"{entry.model.hf} (prebuilt GGUFs: {quant['gguf']})"
    if p.engine is Engine.VLLM and not fmt.hf_dtype:
        return quant[fmt.catalog_key]
    return entry.model.hf or ""


def run_command(repo: str, p: Plan) -> str:
    """The exact command that runs plan `p` for the model `repo` (a hub id or a local path)."""
    r = p.request
    fmt = r.weight_format
    if p.engine is Engine.VLLM:
        # Text on an NVIDIA GPU: qwenkit's server on vLLM (Qwen-correct reasoning, tools, security);
        # images, fp8 KV, first-generation Qwen and vLLM's CPU backend: vLLM's own server.
        qwenkit_ok = r.device.kind == "cuda" and not r.shape.encoder_params and r.kv_type != "fp8"
        if qwenkit_ok and r.shape.model_type != "qwen":
            return f"qwenkit serve --engine vllm --model {repo} --ctx {p.n_ctx} --max-seqs {r.concurrency}"
        cmd = f"vllm serve {repo} --max-model-len {r.context} --max-num-seqs {r.concurrency}"
        if r.kv_type == "fp8":
            cmd += " --kv-cache-dtype fp8"
        if r.shape.model_type == "qwen":
            cmd += " --trust-remote-code"  # first-generation Qwen ships its modelling code
        if p.request.device.kind == "cpu":
            cmd = "VLLM_TARGET_DEVICE=cpu " + cmd
        return cmd
    serve = f"--ctx {p.n_ctx} --max-seqs {r.concurrency}"
    if r.shape.is_hybrid and r.state_cache_mb != SERVE_STATE_CACHE_MB:
        serve += f" --state-cache-mb {r.state_cache_mb}"  # the state cache this plan counted
    if repo.lower().endswith(".gguf"):
        return f"qwenkit serve --model {repo} {serve}"
    if fmt in (WeightFormat.F32, WeightFormat.FP16, WeightFormat.BF16, WeightFormat.Q8_0):
        quant = {WeightFormat.FP16: "f16"}.get(fmt, fmt.value)
        return f"qwenkit serve --model {repo} --quant {quant} {serve}"
    local = f"{repo.rsplit('/', 1)[-1]}-{fmt.value}.gguf"
    return f"qwenkit quantize {repo} --qtype {fmt.value} -o {local} && qwenkit serve --model {local} {serve}"


def select_models(catalog: Catalog, request: SelectRequest) -> list[Recommendation]:
    """Ranked recommendations (best first, one per model); empty when nothing fits."""
    fidelity = catalog.fidelity
    best: dict[str, Recommendation] = {}
    cache: dict = {}
    for entry in catalog:
        fit = entry.family.policy.fit.get(request.task, 0.0)  # type: ignore[call-overload]
        need = _NEEDS.get(request.task)
        if fit <= 0 or not entry.model.open_weights or (need and need not in entry.modalities):
            continue
        try:
            shape = entry.shape()
        except ShapeError:
            continue  # an entry whose dimensions the catalog does not confirm cannot be planned
        if shape.max_context is None or request.context > shape.max_context:
            continue
        size = _size_b(entry)
        for fmt, engine in _formats(entry, request.device, request.task):
            base = PlanRequest(
                shape=shape,
                weight_format=fmt,
                context=request.context,
                concurrency=request.concurrency,
                device=request.device,
                engine=engine,
                runtime=request.runtime,
                state_cache_mb=request.state_cache_mb,
            )
            found = fitting_plan(base, cache)
            if found is None:
                continue
            p, adjustments = found
            quality = fit * math.log2(1 + entry.family.policy.quality_scale * size) * fidelity.get(fmt, 0.9)
            score = quality * speed_factor(p, request.prefer)
            if entry.name in best and best[entry.name].score >= score:
                continue
            repo = _download(entry, p)
            best[entry.name] = Recommendation(
                entry=entry,
                plan=p,
                quality=quality,
                score=score,
                reason=_reason(entry, p),
                adjustments=adjustments,
                command=run_command(repo.split(" ")[0], p),
                download=repo,
            )
    ranked = sorted(best.values(), key=lambda rec: (-rec.score, rec.plan.speed.bytes_per_token))
    return ranked[: request.top]


def speed_factor(p: Plan, prefer: Preference) -> float:
    """The factor select multiplies a configuration's quality by for the user's preference."""
    if prefer == "quality":
        return 1.0  # speed only breaks ties (see the sort in select_models)
    if prefer == "latency":
        tok_s = p.speed.single_tok_s or 1e9 / p.speed.bytes_per_token
        return math.sqrt(tok_s)
    aggregate = p.speed.aggregate_tok_s or p.request.concurrency * 1e9 / p.speed.bytes_per_token
    return math.sqrt(aggregate)


def _reason(entry: Entry, p: Plan) -> str:
    policy = entry.family.policy
    shape = p.request.shape
    extra = ""
    if shape.is_moe:
        active, total = shape.params_active / 1e9, shape.params_total / 1e9
        extra = f"; reads {active:.1f}B of {total:.1f}B parameters per token"
    return f"{policy.why}{extra} — gives up: {policy.gives_up}"
