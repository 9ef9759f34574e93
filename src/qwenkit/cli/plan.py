"""`qwenkit plan`, `qwenkit doctor` and `qwenkit select`: will it fit, what is this machine, which Qwen.

Contract: nothing here downloads a model. The device is this machine, probed (CPU, free RAM, measured
bandwidth; a CUDA GPU with --device cuda), or one described with --memory (and --device, --bandwidth).
Every command prints rich output, or JSON with --json; errors are one line naming the fix. `plan` shows
the memory by part (weights and the MoE experts among them, KV cache, a hybrid's recurrent state, buffers)
and measures the runtime baseline with the model's own vocabulary size. `plan` and `select` describe
`qwenkit serve`: a hybrid's saved-state cache (--state-cache-mb, the server's default) is part of the plan.
`doctor --server URL` reports a running server's live checks instead (cli/server_doctor.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qwenkit import hardware
from qwenkit.catalog.formats import KV_BYTES, WeightFormat, parse_format
from qwenkit.catalog.measure import MeasureError, RuntimeBaseline, cached_runtime_baseline
from qwenkit.catalog.parallel import DEFAULT_UTILIZATION, describe
from qwenkit.catalog.planner import (
    FALLBACK_BASELINE,
    GIB,
    SERVE_STATE_CACHE_MB,
    Device,
    Engine,
    Plan,
    PlanRequest,
    Verdict,
    plan,
)
from qwenkit.catalog.schema import TASKS, load_catalog
from qwenkit.catalog.select import (
    SERVE_QUANTS,
    TEXT_TOWER_TYPES,
    Recommendation,
    SelectRequest,
    run_command,
    select_models,
)
from qwenkit.catalog.target import Target, resolve_target
from qwenkit.cli.common import FlashAttnOption, flash_attn_choice
from qwenkit.cli.errors import err_console, friendly_errors
from qwenkit.cli.plan_gpu import (
    GpusOption,
    NodesOption,
    PipelineParallelOption,
    TensorParallelOption,
    UtilizationOption,
    cluster_device,
    gpu_json,
    gpu_options_given,
    gpu_section,
    print_gpu_section,
)

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(k|m|g|t)?i?b?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

DeviceOption = Annotated[
    str | None, typer.Option("--device", help="cpu or cuda (default: cpu, or what --memory describes).")
]
MemoryOption = Annotated[
    str | None,
    typer.Option(
        "--memory",
        help="Describe the device instead of probing this one: its RAM (cpu) or GPU memory (cuda), e.g. 8GB. "
        "GB and GiB both mean 2^30 bytes.",
    ),
]
BandwidthOption = Annotated[
    float | None,
    typer.Option("--bandwidth", min=0.1, help="Memory bandwidth in GB/s (default: measured here)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
StateCacheOption = Annotated[
    int,
    typer.Option(
        "--state-cache-mb",
        min=0,
        help="The state cache `qwenkit serve` keeps (its --state-cache-mb; hybrid models count it in full).",
    ),
]


def parse_memory(text: str) -> int:
    """Bytes from '8GB', '8 GiB', '512MB', '4g' (binary units throughout)."""
    match = _MEMORY.match(text)
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: write it like 8GB, 512MB or 1.5TB")
    size = float(match.group(1)) * _UNITS[match.group(2).lower() if match.group(2) else None]
    if size < 64 * 1024**2:
        raise ValueError(f"memory size {text!r} is too small to run a model: give at least 64MB")
    return int(size)


def resolve_device(kind: str | None, memory: str | None, bandwidth: float | None) -> Device:
    """The device to plan for: described by --memory, else probed (this CPU, or its CUDA GPU)."""
    if kind not in (None, "cpu", "cuda"):
        raise ValueError(f"unknown device {kind!r}: use cpu or cuda")
    if memory is not None:
        return Device(kind or "cpu", parse_memory(memory), None, bandwidth, None, "described")  # type: ignore[arg-type]
    if kind == "cuda":
        gpus = hardware.gpus(use_torch=importlib.util.find_spec("torch") is not None)
        if not gpus:
            raise ValueError(
                "no CUDA GPU found on this machine: describe one with --device cuda --memory 24GB"
            )
        gpu = gpus[0]
        return Device("cuda", gpu.total_bytes, gpu.free_bytes, bandwidth, None, gpu.name)
    mem = hardware.memory_info()
    if mem.total is None:
        raise ValueError("cannot read this machine's memory: describe it with --memory 16GB")
    bw = bandwidth if bandwidth is not None else hardware.memory_bandwidth().read_gbs
    name = f"{hardware.cpu_model()}, {hardware.physical_cores()} cores"
    return Device("cpu", mem.total, mem.available, bw, hardware.cpu_flags(), name)


def runtime_baseline(vocab: int | None = None) -> RuntimeBaseline:
    """This machine's measured engine baseline for this vocabulary size (cached), or the documented
    fallback without llama.cpp."""
    if importlib.util.find_spec("llama_cpp") is None:
        return FALLBACK_BASELINE
    try:
        return cached_runtime_baseline(vocab=vocab)
    except (MeasureError, OSError, ValueError) as error:
        err_console.print(f"[yellow]warning:[/] baseline not measured ({error}); using a typical value")
        return FALLBACK_BASELINE


def _size(n: float) -> str:
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 1024**2:.0f} MiB"


# ---- plan ------------------------------------------------------------------------------------------
def _repo_for(target: Target, p: Plan) -> str:
    if target.gguf_path is not None:
        return str(target.gguf_path)
    entry = target.entry
    if entry is None:
        return target.label
    fmt = p.request.weight_format
    if p.engine is Engine.VLLM and not fmt.hf_dtype:
        return entry.model.quantized.get(fmt.catalog_key, entry.model.hf or target.label)
    return entry.model.hf or target.label


def plan_json(p: Plan, command: str) -> dict[str, Any]:
    r = p.request
    return {
        "model": r.shape.name,
        "weight_format": r.weight_format.value,
        "engine": p.engine.value,
        "device": {
            "kind": r.device.kind,
            "name": r.device.name,
            "total_bytes": r.device.total_bytes,
            "available_bytes": r.device.available_bytes,
            "bandwidth_gbs": r.device.bandwidth_gbs,
        },
        "context": r.context,
        "concurrency": r.concurrency,
        "n_ctx_seq": p.n_ctx_seq,
        "n_ctx": p.n_ctx,
        "kv_type": r.kv_type,
        "flash_attn": p.flash_attn,
        "params_total": r.shape.params_total,
        "params_active": r.shape.params_active,
        "memory_bytes": asdict(p.memory) | {"required": p.memory.required},
        "runtime_baseline": asdict(r.runtime),
        "budget_bytes": p.budget,
        "budget_basis": p.budget_basis,
        "verdict": p.verdict.value,
        "changes": [
            {
                "change": c.summary,
                "required_bytes": c.plan.memory.required,
                "context": c.plan.request.context,
                "concurrency": c.plan.request.concurrency,
                "kv_type": c.plan.request.kv_type,
                "weight_format": c.plan.request.weight_format.value,
                "flash_attn": c.plan.flash_attn,
            }
            for c in p.changes
        ],
        "decode_estimate": asdict(p.speed),
        "notes": list(p.notes),
        "images": asdict(p.images) if p.images else None,
        "command": command,
    }


def _print_plan(p: Plan, target: Target, command: str) -> None:
    r, m = p.request, p.memory
    console = Console()
    fmt = target.file_type or r.weight_format.value
    where = f"{r.device.kind} ({r.device.name})" if r.device.name else r.device.kind
    console.print(f"[bold]{target.label}[/] · {fmt} · {p.engine.value} on {where}", highlight=False)
    console.print(
        f"context {r.context} tokens × {r.concurrency} sequence(s) · KV {r.kv_type} · "
        f"flash attention {'on' if p.flash_attn else 'off'} · {r.shape.params_total / 1e9:.2f}B parameters"
        + (f" ({r.shape.params_active / 1e9:.2f}B active)" if r.shape.is_moe else ""),
        highlight=False,
    )
    kv_bytes = KV_BYTES[r.kv_type]
    table = Table(show_header=True, header_style="bold")
    table.add_column("component")
    table.add_column("memory", justify="right")
    table.add_column("how", style="dim")
    table.add_row(
        "weights",
        _size(m.weights),
        f"{fmt} as stored"
        + (" (+16-bit encoder)" if r.shape.encoder_params and p.engine is Engine.VLLM else ""),
    )
    if m.experts:
        table.add_row(
            "  of which MoE experts",
            _size(m.experts),
            f"all {r.shape.experts} experts stay resident; {r.shape.experts_used} are read per token",
        )
    if m.repacked:
        table.add_row(
            "repacked copy",
            _size(m.repacked),
            "llama.cpp re-lays these out for SIMD; their file pages are reclaimable",
        )
    kv_layers = (
        f"{r.shape.kv_layers} of {r.shape.layers} layers (full attention only)"
        if r.shape.is_hybrid
        else f"{r.shape.layers} layers"
    )
    table.add_row(
        "KV cache",
        _size(m.kv_cache),
        f"{kv_layers} × {r.shape.kv_heads} KV heads × {r.shape.head_dim} × 2 × {kv_bytes:g} B × "
        f"{p.n_ctx} cells",
    )
    if r.shape.is_hybrid:
        sh = r.shape
        conv_width = sh.conv_state_elements // max(1, sh.conv_kernel - 1)
        table.add_row(
            "recurrent state",
            _size(m.recurrent),
            f"{sh.linear_layers} DeltaNet layers × (conv {sh.conv_kernel - 1}×{conv_width} + delta "
            f"{sh.linear_v_heads}×{sh.linear_k_dim}×{sh.linear_v_dim}) × 4 B × {r.concurrency} sequence(s)",
        )
    if m.state_cache:
        table.add_row(
            "state cache",
            _size(m.state_cache),
            "qwenkit serve's saved conversation states at their bound (--state-cache-mb)",
        )
    if m.vision:
        table.add_row(
            "vision projector",
            _size(m.vision),
            f"{r.shape.encoder_params / 1e6:.0f}M vision-tower parameters × {r.mmproj_type} (--mmproj)",
        )
    if m.vision_compute:
        table.add_row(
            "vision encoder buffer",
            _size(m.vision_compute),
            "llama.cpp's compute buffer at the largest image (kept once reached)",
        )
    table.add_row(
        "compute + activations", _size(m.compute), "worst step: a full prompt chunk over a whole context"
    )
    if m.output:
        table.add_row("logits buffer", _size(m.output), f"n_vocab {r.shape.vocab} × {r.concurrency} × 4 B")
    table.add_row(
        "runtime",
        _size(m.runtime),
        r.runtime.source if p.engine is Engine.LLAMACPP and r.device.kind == "cpu" else "estimate",
    )
    table.add_row(
        "[bold]peak resident[/]",
        f"[bold]{_size(m.peak)}[/]",
        "predicted peak RSS" if r.device.kind == "cpu" else "predicted GPU memory",
    )
    if m.reclaimable:
        table.add_row("must fit", _size(m.required), "peak less reclaimable file pages")
    table.add_row("budget", _size(p.budget), p.budget_basis)
    console.print(table)
    color = {Verdict.FITS: "green", Verdict.FITS_WITH_CHANGES: "yellow", Verdict.DOES_NOT_FIT: "red"}[
        p.verdict
    ]
    console.print(f"verdict: [bold {color}]{p.verdict.value}[/] ({_size(m.required)} of {_size(p.budget)})")
    for c in p.changes:
        console.print(f"  • {c.summary} → {_size(c.plan.memory.required)}", highlight=False)
    s = p.speed
    if s.single_tok_s:
        console.print(
            f"decode: ≈{s.single_tok_s:.0f} tok/s single stream, ≈{s.aggregate_tok_s:.0f} tok/s over "
            f"{r.concurrency} ({s.basis}; {_size(s.bytes_per_token)} read per token)",
            highlight=False,
        )
    else:
        console.print(
            f"decode: unknown ({s.basis}; {_size(s.bytes_per_token)} read per token)", highlight=False
        )
    for note in p.notes:
        console.print(f"note: {note}", style="dim", highlight=False)
    console.print(f"run: [bold]{command}[/]", highlight=False)


@friendly_errors
def plan_command(
    model: Annotated[str, typer.Argument(help="Catalog name, hub id, local checkpoint dir or .gguf file.")],
    weight_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help=f"Weights: {', '.join(f.value for f in WeightFormat)} "
            "(default: q4_k_m on cpu, bf16 on cuda).",
        ),
    ] = None,
    ctx: Annotated[
        int | None,
        typer.Option(
            "--ctx", min=64, help="Context per sequence (default: 8192 or the model's native, if less)."
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, max=256, help="Sequences served at once.")
    ] = 1,
    kv: Annotated[
        str, typer.Option("--kv", help="KV cache type: f16, f32, q8_0 (llama.cpp) or fp8 (vLLM).")
    ] = "f16",
    flash_attn: FlashAttnOption = "auto",
    state_cache_mb: StateCacheOption = SERVE_STATE_CACHE_MB,
    images: Annotated[
        bool,
        typer.Option(
            "--images",
            help="Plan a vision model on llama.cpp with its projector loaded (serve --mmproj): its memory "
            "and each request's image-token budget.",
        ),
    ] = False,
    device: DeviceOption = None,
    memory: MemoryOption = None,
    bandwidth: BandwidthOption = None,
    as_json: JsonOption = False,
    gpus: GpusOption = None,
    nodes: NodesOption = 1,
    tensor_parallel: TensorParallelOption = None,
    pipeline_parallel: PipelineParallelOption = None,
    gpu_memory_utilization: UtilizationOption = DEFAULT_UTILIZATION,
) -> None:
    """Predict the memory a model needs here (weights, KV cache, buffers) and whether it fits."""
    catalog = load_catalog()
    target = resolve_target(model, catalog)
    dev = resolve_device(device, memory, bandwidth)
    multi_gpu = gpu_options_given(gpus, nodes, tensor_parallel, pipeline_parallel)
    gpu_bytes = dev.total_bytes
    if multi_gpu:  # the whole-model plan is checked against the cluster, then split per GPU below
        dev, _ = cluster_device(dev, gpus or 1, nodes)
    # Vision/audio: vLLM, 16-bit unless a format says; Qwen3.5's text tower runs on llama.cpp alone.
    multimodal = target.shape.encoder_params > 0 and target.shape.model_type not in TEXT_TOWER_TYPES
    if target.layout is not None:
        if weight_format is not None and parse_format(weight_format) is not target.format_hint:
            raise ValueError(
                f"{target.label} is a {target.file_type} GGUF: drop --format, or quantize it first"
            )
        fmt = target.format_hint or WeightFormat.Q4_K_M
    elif weight_format is not None:
        fmt = parse_format(weight_format)
        if images and fmt.is_gguf and fmt not in SERVE_QUANTS:
            raise ValueError(
                f"--images with --format {fmt.value}: `serve --mmproj auto` converts the vision tower from "
                "the checkpoint, which it serves as f16/bf16/q8_0: plan --format q8_0"
            )
    else:
        # With images the checkpoint is served as it is (`--quant q8_0 --mmproj auto`), not quantized first.
        cpu_default = (
            WeightFormat.Q8_0 if images else WeightFormat.BF16 if multimodal else WeightFormat.Q4_K_M
        )
        fmt = target.format_hint or (WeightFormat.BF16 if dev.kind == "cuda" else cpu_default)
    native = target.shape.context_native
    context = ctx or (min(8192, native) if native else 8192)
    allowed = None
    if target.entry is not None:
        quant = target.entry.model.quantized
        allowed = frozenset(f for f in WeightFormat if f.is_gguf or f.hf_dtype or f.catalog_key in quant)
    request = PlanRequest(
        shape=target.shape,
        weight_format=fmt,
        context=context,
        concurrency=concurrency,
        device=dev,
        kv_type=kv,
        engine=Engine.VLLM if (multimodal and not images) or multi_gpu else None,
        flash_attn=flash_attn_choice(flash_attn),
        runtime=runtime_baseline(target.shape.vocab),
        layout=target.layout,
        formats_allowed=allowed,
        state_cache_mb=state_cache_mb,
        images=images,
    )
    p = plan(request)
    command = run_command(_repo_for(target, p), p)
    if multi_gpu:
        args = (gpu_bytes, gpus or 1, nodes, tensor_parallel, pipeline_parallel, gpu_memory_utilization)
        g, cmds = gpu_section(p, _repo_for(target, p), *args)
        command = cmds[-2]  # the qwenkit command; the raw vLLM one follows it in "gpu"
    if as_json:
        out = plan_json(p, command)
        if multi_gpu:
            out["gpu"] = gpu_json(g, cmds)
        typer.echo(json.dumps(out, indent=2))
    else:
        _print_plan(p, target, command)
        if multi_gpu:
            print_gpu_section(g, cmds)


# ---- doctor ----------------------------------------------------------------------------------------
def _cache_paths() -> dict[str, Path]:
    from qwenkit.checkpoints.resolve import hf_cache_dir, modelscope_cache_root
    from qwenkit.paths import cache_root

    return {
        "qwenkit cache": cache_root(),
        "Hugging Face cache": hf_cache_dir(os.environ),
        "ModelScope cache": modelscope_cache_root(os.environ),
    }


def _llama_check() -> tuple[RuntimeBaseline | None, str]:
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "not installed"
    try:
        return cached_runtime_baseline(
            refresh=True
        ), "working: loaded the demo model's vocabulary in a fresh process"
    except (MeasureError, OSError, ValueError) as error:
        return None, f"not working: {error}"


@friendly_errors
def doctor_command(
    as_json: JsonOption = False,
    no_bandwidth: Annotated[
        bool, typer.Option("--no-bandwidth", help="Skip the memory bandwidth test.")
    ] = False,
    server: Annotated[
        str | None,
        typer.Option("--server", help="Check a running `qwenkit serve` at this URL instead (live advice)."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="QWENKIT_API_KEY", help="The server's API key.")
    ] = None,
) -> None:
    """Probe this machine: CPU, SIMD, RAM, bandwidth, GPUs, disk at the model caches, engines."""
    if server is not None:  # a server's live checks: serve/health.py via cli/server_doctor.py
        from qwenkit.cli.server_doctor import server_doctor

        return server_doctor(server, api_key, as_json)
    report = hardware.probe(_cache_paths(), bandwidth=not no_bandwidth)
    baseline, llama_state = _llama_check()
    if as_json:
        data = asdict(report)
        data["cpu_flags"] = sorted(report.cpu_flags) if report.cpu_flags is not None else None
        data["disks"] = [asdict(d) | {"path": str(d.path)} for d in report.disks]
        data["llama_cpp_check"] = llama_state
        data["runtime_baseline"] = asdict(baseline) if baseline else None
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console()
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row(
        "CPU",
        f"{report.cpu_model} · {report.physical_cores} physical cores, {report.logical_cpus} usable CPUs",
    )
    t.add_row("SIMD", " ".join(report.simd) or "unknown")
    mem = report.memory
    limit = f" (cgroup limit {_size(mem.cgroup_limit)})" if mem.cgroup_limit else ""
    t.add_row("RAM", f"{_size(mem.total or 0)} total, {_size(mem.available or 0)} available{limit}")
    if report.bandwidth:
        b = report.bandwidth
        t.add_row(
            "bandwidth",
            f"{b.read_gbs:.1f} GB/s read, {b.copy_gbs:.1f} GB/s copy "
            f"({b.threads} threads, {b.array_mib} MiB arrays)",
        )
    for g in report.gpus or []:
        free = f", {_size(g.free_bytes)} free" if g.free_bytes is not None else ""
        t.add_row(
            "GPU",
            f"{g.name}: {_size(g.total_bytes)}{free} (compute {g.compute_capability or '?'}, via {g.source})",
        )
    if not report.gpus:
        t.add_row("GPU", "none found (no CUDA torch, no nvidia-smi)")
    for d in report.disks:
        free = f"{_size(d.free_bytes)} free" if d.free_bytes is not None else "unknown"
        t.add_row("disk", f"{d.what}: {free} at {d.path}")
    for e in report.engines:
        state = f"{e.version}" if e.installed else "not installed"
        detail = llama_state if e.name == "llama.cpp" and e.installed else e.detail
        t.add_row("engine", f"{e.name} {state}" + (f" — {detail}" if detail else ""))
    if baseline:
        t.add_row(
            "planner",
            f"engine baseline {_size(baseline.steady_bytes)} resident "
            f"(peak {_size(baseline.peak_bytes)}), measured",
        )
    console.print(t)


# ---- select ----------------------------------------------------------------------------------------
def recommendation_json(rec: Recommendation) -> dict[str, Any]:
    return {
        "model": rec.entry.name,
        "family": rec.entry.family_key,
        "weight_format": rec.weight_format.value,
        "engine": rec.engine.value,
        "adjustments": list(rec.adjustments),
        "quality_score": round(rec.quality, 3),
        "score": round(rec.score, 3),
        "reason": rec.reason,
        "download": rec.download,
        "command": rec.command,
        "plan": plan_json(rec.plan, rec.command),
        **({"gpu": gpu_json(rec.gpu, [*rec.setup, rec.command])} if rec.gpu is not None else {}),
    }


@friendly_errors
def select_command(
    task: Annotated[str, typer.Option("--task", "-t", help=f"One of: {', '.join(TASKS)}.")] = "chat",
    device: DeviceOption = None,
    memory: MemoryOption = None,
    bandwidth: BandwidthOption = None,
    prefer: Annotated[
        str, typer.Option("--prefer", help="quality, latency (one user) or throughput (many).")
    ] = "quality",
    ctx: Annotated[
        int | None,
        typer.Option(
            "--ctx", min=256, help="Context each request needs (default: 4096; 131072 for long-context)."
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, max=256, help="Requests served at once.")
    ] = 1,
    top: Annotated[int, typer.Option("--top", min=1, max=50, help="How many to list.")] = 5,
    state_cache_mb: StateCacheOption = SERVE_STATE_CACHE_MB,
    as_json: JsonOption = False,
    gpus: GpusOption = None,
    nodes: NodesOption = 1,
    gpu_memory_utilization: UtilizationOption = DEFAULT_UTILIZATION,
) -> None:
    """Rank the Qwen models, formats and engines that fit this device for a task, with the command to run."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    context = ctx or (131072 if task == "long-context" else 4096)
    dev = resolve_device(device, memory, bandwidth)
    if gpu_options_given(gpus, nodes, None, None):
        cluster_device(dev, gpus or 1, nodes)  # refuses a CPU, or more GPUs than are here
    elif dev.kind == "cuda" and memory is None:
        present = len(hardware.gpus(use_torch=False))
        gpus = present if present > 1 else None  # a probed multi-GPU machine: plan on all its GPUs
    request = SelectRequest(
        task,
        dev,
        context,
        concurrency,
        prefer,  # type: ignore[arg-type]
        runtime_baseline(),
        top,
        state_cache_mb,
        gpus=gpus or (1 if nodes > 1 else None),
        nodes=nodes,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    recs = select_models(load_catalog(), request)
    if as_json:
        typer.echo(json.dumps([recommendation_json(r) for r in recs], indent=2))
        return
    if not recs:
        where = "on this device" if request.gpus is None else f"on {nodes} node(s) × {request.gpus} GPU(s)"
        more = "a larger --memory" if request.gpus is None else "more --gpus / --nodes or a larger --memory"
        raise ValueError(
            f"no Qwen model fits {task} with {context} tokens × {concurrency} {where}: "
            f"lower --ctx or --concurrency, or give {more}"
        )
    budget, basis = dev.budget()
    if request.gpus is not None:
        basis = f"per GPU, {nodes} node(s) × {request.gpus} GPU(s) at {gpu_memory_utilization:g} utilization"
    console = Console()
    console.print(
        f"[bold]{task}[/] · {context} tokens × {concurrency} · prefer {prefer} · {dev.kind} "
        f"{dev.name} · budget {_size(budget)} ({basis})",
        highlight=False,
    )
    table = Table()
    for col in ("#", "model", "format", "engine", "memory", "decode (est.)", "adjusted"):
        table.add_column(col, no_wrap=col in ("model", "format", "engine", "memory"))
    for i, rec in enumerate(recs, 1):
        p = rec.plan
        speed = f"≈{p.speed.single_tok_s:.0f} tok/s" if p.speed.single_tok_s else "?"
        table.add_row(
            str(i),
            rec.entry.name,
            rec.weight_format.value,
            rec.engine.value,
            _size(p.memory.required) if rec.gpu is None else f"{_size(rec.gpu.required)}/GPU",
            speed,
            ", ".join(rec.adjustments) or "-",
        )
    console.print(table)
    for i, rec in enumerate(recs, 1):
        console.print(f"{i}. {rec.entry.name}: {rec.reason}", highlight=False)
        if rec.gpu is not None:
            console.print(f"   layout: {describe(rec.gpu)[0]}", highlight=False, soft_wrap=True)
        for line in rec.setup:
            console.print(f"   {line}", highlight=False, soft_wrap=True)
        console.print(f"   run: [bold]{rec.command}[/]", highlight=False, soft_wrap=True)
