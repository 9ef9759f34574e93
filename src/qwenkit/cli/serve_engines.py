"""`qwenkit serve` past one llama.cpp process: --engine vllm (GPUs, tensor/pipeline parallel, Ray nodes)
and --replicas N (llama.cpp engines on Ray Serve).

Contract: check_scale_options() refuses option mixes that cannot work, and a --ray-address where no Ray
answers, in one line. open_vllm() checks, before any weights load and in this order, the model (an HF
checkpoint), the parallel layout against its heads (catalog/parallel.py) and whether vLLM can run here
(installed, enough NVIDIA GPUs), then returns the VllmEngine (its weights load when the server starts
it) with the tokenizer and chat family, and a vision checkpoint's image grid (preprocessor_config.json:
the server then takes images and vLLM runs the vision tower). open_replicas() starts the Ray Serve
replicas over a converted GGUF; serve_vllm() runs the server on the vLLM engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer

from qwenkit.engines.llamacpp.config import EngineConfig

EngineChoice = Annotated[
    str,
    typer.Option(
        "--engine",
        help="llamacpp (CPU/edge, the default) or vllm (NVIDIA GPUs; the vllm extra).",
    ),
]
TensorParallel = Annotated[
    int, typer.Option("--tensor-parallel", min=1, help="vLLM: GPUs each layer is split over.")
]
PipelineParallel = Annotated[
    int, typer.Option("--pipeline-parallel", min=1, help="vLLM: pipeline stages (one per node, usually).")
]
DataParallel = Annotated[int, typer.Option("--data-parallel", min=1, help="vLLM: copies of the model.")]
GpuUtilization = Annotated[
    float,
    typer.Option("--gpu-memory-utilization", min=0.05, max=1.0, help="vLLM: share of each GPU it takes."),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="A Ray cluster (host:port) for vLLM's workers on several nodes, or for --replicas.",
    ),
]
Replicas = Annotated[
    int,
    typer.Option(
        "--replicas",
        min=1,
        max=64,
        help="llama.cpp engines on Ray Serve behind this endpoint, least-loaded first (the ray extra); "
        "--threads is per replica.",
    ),
]


@dataclass(frozen=True)
class ScaleOptions:
    engine: str = "llamacpp"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    ray_address: str | None = None
    replicas: int = 1


def check_scale_options(o: ScaleOptions, llamacpp_only: dict[str, bool]) -> None:
    """One-line errors for mixes that cannot work; llamacpp_only: llama.cpp options the user set."""
    if o.engine not in ("llamacpp", "vllm"):
        raise ValueError(f"--engine {o.engine!r}: use llamacpp or vllm")
    if o.engine == "vllm":
        if o.replicas > 1:
            raise ValueError(
                "--replicas runs llama.cpp engines; for copies of a vLLM model use --data-parallel"
            )
        used = [name for name, on in llamacpp_only.items() if on]
        if used:
            raise ValueError(f"{used[0]} is a llama.cpp option: drop it with --engine vllm")
        check_ray(o)
        return
    parallel = (o.tensor_parallel, o.pipeline_parallel, o.data_parallel) != (1, 1, 1)
    if parallel or o.gpu_memory_utilization != 0.9:
        raise ValueError(
            "--tensor/--pipeline/--data-parallel and --gpu-memory-utilization need --engine vllm"
        )
    if o.ray_address is not None and o.replicas == 1:
        raise ValueError("--ray-address needs --replicas N (llama.cpp) or --engine vllm")
    check_ray(o)


def check_ray(o: ScaleOptions) -> None:
    """A --ray-address that does not answer fails here, before any model is opened."""
    if o.ray_address is not None:
        from qwenkit.engines.replicas import check_ray_address

        check_ray_address(o.ray_address)


@dataclass
class Opened:
    engine: Any
    tokenizer: Any
    family: Any
    name: str
    is_demo: bool
    vision: Any = None  # the VisionSpec of a model with a vision tower: the server then takes images


def open_vllm(
    model: str | None, allow_pickle: bool, max_seqs: int, ctx: int | None, o: ScaleOptions
) -> Opened:
    """The vLLM engine for --model, checked before any weights load (see the module docstring)."""
    from qwenkit.catalog.parallel import Layout, check_layout
    from qwenkit.catalog.shape import ModelShape
    from qwenkit.chat.families import choose_family, template_from_dir
    from qwenkit.checkpoints.demo import is_demo_checkpoint
    from qwenkit.cli.common import load_model
    from qwenkit.cli.serve import default_ctx
    from qwenkit.engines.vllm import unavailable_reason
    from qwenkit.engines.vllm.engine import VllmEngine
    from qwenkit.engines.vllm.translate import VllmSettings
    from qwenkit.media.images import VisionSpec
    from qwenkit.tokenizer.tokenizer import QwenTokenizer

    resolved = load_model(model, allow_pickle)
    if resolved.kind != "hf":
        raise ValueError(
            "vLLM serves Hugging Face checkpoints: give the checkpoint directory or hub id, "
            "or serve this .gguf with --engine llamacpp"
        )
    shape = ModelShape.from_config(resolved.config or {}, resolved.name)
    per_node = o.tensor_parallel * o.pipeline_parallel * o.data_parallel
    layout = Layout(o.tensor_parallel, o.pipeline_parallel, o.data_parallel, False, 1, per_node)
    check_layout(shape, layout)
    # With a Ray cluster the GPUs may sit on other nodes; this one needs at least one.
    reason = unavailable_reason(1 if o.ray_address else per_node)
    if reason is not None:
        raise ValueError(reason)
    family, _ = choose_family(template_from_dir(resolved.path), resolved.model_type or "qwen3")
    tokenizer = QwenTokenizer.from_dir(resolved.path)
    per_request = (ctx or default_ctx(max_seqs, shape.context_native)) // max_seqs
    settings = VllmSettings(
        model=str(resolved.path),
        max_model_len=per_request,
        tensor_parallel=o.tensor_parallel,
        pipeline_parallel=o.pipeline_parallel,
        data_parallel=o.data_parallel,
        expert_parallel=shape.is_moe and o.tensor_parallel * o.data_parallel > 1,
        gpu_memory_utilization=o.gpu_memory_utilization,
        max_num_seqs=max_seqs,
        ray_address=o.ray_address,
    )
    think = (tokenizer.special_id("<think>"), tokenizer.special_id("</think>"))
    vision = VisionSpec.from_checkpoint(resolved.path)  # vLLM runs the vision tower itself
    pad = tokenizer.special_id("<|image_pad|>")
    engine = VllmEngine.from_settings(settings, tokenizer.vocab_size, think, vision, pad)
    return Opened(engine, tokenizer, family, resolved.name, is_demo_checkpoint(resolved.path), vision)


def open_replicas(gguf_path: Any, config: EngineConfig, o: ScaleOptions) -> Any:
    """N llama.cpp engines on Ray Serve (a local Ray, or the cluster at --ray-address)."""
    from qwenkit.engines.replicas import start_replicas

    return start_replicas(gguf_path, config, o.replicas, o.ray_address)


def serve_vllm(
    model: str | None,
    allow_pickle: bool,
    max_seqs: int,
    ctx: int | None,
    o: ScaleOptions,
    config: Any,
    sock: Any,
    keys: list[str],
) -> None:
    """`qwenkit serve --engine vllm`: the same app and server as llama.cpp's, on the vLLM engine."""
    from qwenkit.cli.serve import announce_and_run
    from qwenkit.serve.app import create_app

    opened = open_vllm(model, allow_pickle, max_seqs, ctx, o)
    # Before the server: a model vLLM cannot load fails in one line (AsyncLLM may be built off the loop).
    opened.engine.start()
    app = create_app(
        opened.engine, opened.tokenizer, opened.family, opened.name, config, vision=opened.vision
    )
    layout = f"tensor {o.tensor_parallel} x pipeline {o.pipeline_parallel} x data {o.data_parallel}"
    name = config.served_model_name or opened.name
    auth = "on" if keys else "off"
    announce_and_run(
        app,
        sock,
        config,
        name,
        opened.engine.n_ctx,
        max_seqs,
        auth,
        opened.is_demo,
        label=f" (vLLM, {layout})",
    )
