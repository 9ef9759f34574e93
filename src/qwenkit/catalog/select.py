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
With `gpus` (GPUs per node, `device` being one of them) and `nodes`, every configuration is vLLM: the
whole-model plan is checked against the cluster (parallel.cluster), laid out with a valid tensor-parallel
size (parallel.split_plan) and must fit each GPU at gpu_memory_utilization; the command is parallel.commands'
(`qwenkit serve --engine vllm --tensor-parallel N ...`, after the `ray start` lines of several nodes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from qwenkit.catalog.formats import WeightFormat
from qwenkit.catalog.measure import RuntimeBaseline
from qwenkit.catalog.parallel import (
    DEFAULT_UTILIZATION,
    GpuPlan,
    ParallelError,
    check_utilization,
    cluster,
    commands,
    split_plan,
)
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
from qwenkit.catalog.shape import VISION_LAYOUTS, ShapeError

__all__ = [
    "TEXT_TOWER_TYPES",
    "Preference",
    "Recommendation",
    "SelectRequest",
    "fitting_plan",
    "qwenkit_serves",
    "run_command",
    "select_models",
]

Preference = Literal["quality", "latency", "throughput"]
# Text models qwenkit's llama.cpp engine (and converter) can run; VL ones as llama.cpp's qwen2vl / qwen3vl.
_LLAMACPP_TYPES = frozenset(
    {
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "qwen3_next",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen2_5_vl",
        "qwen3_vl",
    }
)
# Multimodal families whose text tower qwenkit converts, and its vision tower too (--mmproj auto).
TEXT_TOWER_TYPES = frozenset({"qwen3_5", "qwen3_5_moe", "qwen2_5_vl", "qwen3_vl"})
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
    gpus: int | None = None  # GPUs per node, each like `device`: vLLM with a parallel layout
    nodes: int = 1
    gpu_memory_utilization: float = DEFAULT_UTILIZATION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.prefer not in ("quality", "latency", "throughput"):
            raise ValueError(f"unknown preference {self.prefer!r}: use quality, latency or throughput")
        if self.gpus is not None or self.nodes != 1:
            cluster(self.device, self.gpus or 0, self.nodes)  # one-line refusals: not cuda, gpus < 1
            check_utilization(self.gpu_memory_utilization)

    @property
    def plan_device(self) -> Device:
        """The device whole-model plans are checked against: the cluster when GPUs were given."""
        return self.device if self.gpus is None else cluster(self.device, self.gpus, self.nodes)

    def split(self, p: Plan) -> GpuPlan:
        """Plan `p` (on plan_device) laid out over the GPUs; needs `gpus`."""
        assert self.gpus is not None
        return split_plan(
            p, self.device.total_bytes, self.gpus, self.nodes, None, None, self.gpu_memory_utilization
        )


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
    gpu: GpuPlan | None = None  # the per-GPU layout (select with gpus)
    setup: tuple[str, ...] = ()  # commands to run first (Ray on each node)

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
    # qwenkit converts both towers of TEXT_TOWER_TYPES, so images run on llama.cpp too (serve --mmproj auto).
    towers_ok = arch is not None and arch.type in TEXT_TOWER_TYPES and (text_task or task == "vision")
    gguf_ok = (
        (text_only or towers_ok)
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
    if gguf_ok and task == "vision":
        # `--mmproj auto` converts the vision tower from the checkpoint, which `serve --quant` reads as it is;
        # a `qwenkit quantize`d GGUF has no checkpoint beside it, so images are offered in q8_0.
        out.append((WeightFormat.Q8_0, Engine.LLAMACPP))
    elif gguf_ok:
        out.extend((fmt, Engine.LLAMACPP) for fmt in CPU_GGUF_FORMATS)
    elif device.kind == "cpu" and not text_only:
        out.append((WeightFormat.BF16, Engine.VLLM))  # vision/audio on a CPU: vLLM's CPU backend in bf16
    return out


def fitting_plan(
    base: PlanRequest, cache: dict, accept: Callable[[Plan], bool] | None = None
) -> tuple[Plan, tuple[str, ...]] | None:
    """The plan as asked, else (if asked off) with flash attention, else with a quantized KV cache, else
    (a served hybrid on a CPU) also with the saved-state cache capped at SMALL_STATE_CACHE_MB. `accept`
    is a further check a fitting plan must pass (each GPU's share, for a multi-GPU layout)."""
    tries = [(base, ())]
    if base.resolved_engine is Engine.LLAMACPP:
        kv = "KV cache q8_0" if base.resolved_flash_attn else "KV cache q8_0 + flash attention"
        if not base.resolved_flash_attn:  # asked off; llama.cpp's default (auto) has it on
            tries.append((replace(base, flash_attn=True), ("flash attention on",)))
        quantized = replace(base, kv_type="q8_0", flash_attn=True)
        tries.append((quantized, (kv,)))
        shrinkable = base.serves_state_cache and base.device.kind == "cpu"
        if shrinkable and base.state_cache_mb > SMALL_STATE_CACHE_MB:
            capped = replace(quantized, state_cache_mb=SMALL_STATE_CACHE_MB)
            tries.append((capped, (kv, f"state cache {SMALL_STATE_CACHE_MB} MiB")))
    else:
        tries.append((replace(base, kv_type="fp8"), ("KV cache fp8",)))
    for request, adjustments in tries:
        p = plan(request, suggest=False, cache=cache)
        if p.fits and (accept is None or accept(p)):
            return p, adjustments
    return None


def _download(entry: Entry, p: Plan) -> str:
    quant, fmt = entry.model.quantized, p.request.weight_format
    if p.engine is Engine.LLAMACPP and "gguf" in quant:
        return f"{entry.model.hf} (prebuilt GGUFs: {quant['gguf']})"
    if p.engine is Engine.VLLM and not fmt.hf_dtype:
        return quant[fmt.catalog_key]
    return entry.model.hf or ""


def qwenkit_serves(p: Plan) -> bool:
    """Whether `qwenkit serve --engine vllm` runs vLLM plan `p`: text, and images for the vision towers
    qwenkit sizes (VISION_LAYOUTS), on an NVIDIA GPU (Qwen-correct reasoning, tools, security); audio,
    Qwen2-VL, an fp8 KV cache, first-generation Qwen and vLLM's CPU backend go to vLLM's own server."""
    r = p.request
    encoders_ok = not r.shape.encoder_params or r.shape.model_type in VISION_LAYOUTS
    return r.device.kind == "cuda" and encoders_ok and r.kv_type != "fp8" and r.shape.model_type != "qwen"


# The formats `serve --quant` converts a checkpoint to (others need `qwenkit quantize` first).
SERVE_QUANTS = frozenset({WeightFormat.F32, WeightFormat.FP16, WeightFormat.BF16, WeightFormat.Q8_0})


def run_command(repo: str, p: Plan) -> str:
    """The exact command that runs plan `p` for the model `repo` (a hub id or a local path)."""
    r = p.request
    fmt = r.weight_format
    if p.engine is Engine.VLLM:
        if qwenkit_serves(p):
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
    if r.kv_type != "f16":
        serve += f" --kv {r.kv_type}"  # the KV cache this plan counted (fitting_plan may quantize it)
    if r.flash_attn is False:
        serve += " --flash-attn off"
    is_gguf = repo.lower().endswith(".gguf")
    if r.images:
        # A checkpoint's vision tower is converted once and cached; a .gguf comes with its own projector file.
        serve += " --mmproj mmproj.gguf" if is_gguf else " --mmproj auto"
    if r.shape.is_hybrid and r.state_cache_mb != SERVE_STATE_CACHE_MB:
        serve += f" --state-cache-mb {r.state_cache_mb}"  # the state cache this plan counted
    if is_gguf:
        return f"qwenkit serve --model {repo} {serve}"
    if fmt in SERVE_QUANTS:
        quant = {WeightFormat.FP16: "f16"}.get(fmt, fmt.value)
        return f"qwenkit serve --model {repo} --quant {quant} {serve}"
    local = f"{repo.rsplit('/', 1)[-1]}-{fmt.value}.gguf"
    return f"qwenkit quantize {repo} --qtype {fmt.value} -o {local} && qwenkit serve --model {local} {serve}"


def select_models(catalog: Catalog, request: SelectRequest) -> list[Recommendation]:
    """Ranked recommendations (best first, one per model); empty when nothing fits."""
    fidelity = catalog.fidelity
    best: dict[str, Recommendation] = {}
    cache: dict = {}
    device = request.plan_device
    on_gpus = request.gpus is not None

    def splits(p: Plan) -> bool:
        try:
            return request.split(p).fits
        except ParallelError:  # no layout of these GPUs suits this model (e.g. more stages than layers)
            return False

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
            if on_gpus and engine is not Engine.VLLM:
                continue  # qwenkit's llama.cpp engine runs one process on one device
            base = PlanRequest(
                shape=shape,
                weight_format=fmt,
                context=request.context,
                concurrency=request.concurrency,
                device=device,
                engine=engine,
                runtime=request.runtime,
                state_cache_mb=request.state_cache_mb,
                images=engine is Engine.LLAMACPP and request.task == "vision",
            )
            found = fitting_plan(base, cache, splits if on_gpus else None)
            if found is None:
                continue
            p, adjustments = found
            quality = fit * math.log2(1 + entry.family.policy.quality_scale * size) * fidelity.get(fmt, 0.9)
            score = quality * speed_factor(p, request.prefer)
            if entry.name in best and best[entry.name].score >= score:
                continue
            repo = _download(entry, p)
            command, gpu, setup = run_command(repo.split(" ")[0], p), None, ()
            if on_gpus:
                gpu = request.split(p)
                *setup_lines, ours, raw = commands(repo.split(" ")[0], p, gpu)
                command, setup = (ours if qwenkit_serves(p) else raw), tuple(setup_lines)
            best[entry.name] = Recommendation(
                entry=entry,
                plan=p,
                quality=quality,
                score=score,
                reason=_reason(entry, p),
                adjustments=adjustments,
                command=command,
                download=repo,
                gpu=gpu,
                setup=setup,
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
