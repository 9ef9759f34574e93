"""`qwenkit plan --gpus N [--nodes M]`: the vLLM part of a plan on several GPUs and nodes.

Contract: gpu_options_given() says whether the multi-GPU options were used; cluster_device() turns one
GPU (probed or described with --memory) into the whole cluster the whole-model plan is checked against,
refusing more GPUs than this machine has when it was probed; gpu_section() lays the model out (catalog/
parallel.py), prints per-GPU memory and the exact commands (or returns them as JSON). Errors are
ParallelError / ValueError one-liners naming the fix.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from qwenkit import hardware
from qwenkit.catalog.parallel import (
    DEFAULT_UTILIZATION,
    GpuPlan,
    ParallelError,
    cluster,
    commands,
    describe,
    split_plan,
)
from qwenkit.catalog.planner import Device, Plan

GpusOption = Annotated[
    int | None, typer.Option("--gpus", min=1, max=64, help="GPUs per node, for a vLLM plan (--device cuda).")
]
NodesOption = Annotated[
    int, typer.Option("--nodes", min=1, max=64, help="Nodes of --gpus GPUs each (vLLM on a Ray cluster).")
]
TensorParallelOption = Annotated[
    int | None,
    typer.Option("--tensor-parallel", min=1, help="Tensor-parallel size (default: the GPUs of one node)."),
]
PipelineParallelOption = Annotated[
    int | None, typer.Option("--pipeline-parallel", min=1, help="Pipeline stages (default: --nodes).")
]
UtilizationOption = Annotated[
    float,
    typer.Option(
        "--gpu-memory-utilization", min=0.05, max=1.0, help="Share of each GPU vLLM takes (vLLM's default)."
    ),
]


def gpu_options_given(gpus: int | None, nodes: int, tp: int | None, pp: int | None) -> bool:
    return gpus is not None or nodes > 1 or tp is not None or pp is not None


def cluster_device(dev: Device, gpus: int, nodes: int) -> tuple[Device, int | None]:
    """The cluster as one device (its GPUs' memory summed) and the GPUs this machine has (None when the
    device was described, not probed)."""
    whole = cluster(dev, gpus, nodes)  # refuses a CPU device first
    present = None if dev.name == "described" else len(hardware.gpus(use_torch=False)) or None
    if present is not None and gpus > present:
        raise ParallelError(
            f"--gpus {gpus} but this machine has {present} GPU(s): use --gpus {present}, "
            "or describe the nodes with --memory (one GPU's memory)"
        )
    return whole, present


def gpu_section(
    p: Plan,
    repo: str,
    gpu_bytes: int,
    gpus: int,
    nodes: int,
    tp: int | None,
    pp: int | None,
    utilization: float = DEFAULT_UTILIZATION,
) -> tuple[GpuPlan, list[str]]:
    """The per-GPU plan of `p` (a whole-cluster vLLM plan) and the commands that run it."""
    g = split_plan(p, gpu_bytes, gpus, nodes, tp, pp, utilization)
    return g, commands(repo, p, g)


def print_gpu_section(g: GpuPlan, cmds: list[str]) -> None:
    console = Console()
    verdict = "[green]fits[/]" if g.fits else "[red]does not fit[/]"
    console.print(f"[bold]vLLM layout[/] · per GPU {verdict}", highlight=False)
    for line in describe(g):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    if not g.fits:
        console.print(
            "  more GPUs (--gpus/--nodes), an fp8 KV cache (--kv fp8), a smaller --ctx or fewer sequences "
            "(-c) would make room",
            highlight=False,
            soft_wrap=True,
        )
    console.print("[bold]commands[/]", highlight=False)
    for cmd in cmds:
        console.print(f"  {cmd}", highlight=False, soft_wrap=True)


def gpu_json(g: GpuPlan, cmds: list[str]) -> dict[str, Any]:
    lay = g.layout
    return {
        "layout": {
            "tensor_parallel": lay.tp,
            "pipeline_parallel": lay.pp,
            "data_parallel": lay.dp,
            "expert_parallel": lay.ep,
            "nodes": lay.nodes,
            "gpus_per_node": lay.gpus_per_node,
        },
        "fits": g.fits,
        "gpu_memory_utilization": g.utilization,
        "per_gpu_bytes": {
            "budget": g.budget,
            "weights": g.weights,
            "activations": g.activations,
            "cuda_graphs": g.cuda_graphs,
            "non_torch": g.non_torch,
            "kv_needed": g.kv_needed,
            "kv_room": g.kv_room,
        },
        "max_seqs_full_context": g.max_seqs,
        "commands": cmds,
    }
