"""vLLM on one or more GPUs and nodes: the parallel layout, the memory each GPU needs, the exact commands.

Contract: pure arithmetic over a planner Plan for the vLLM engine (whole-model figures). tp_sizes() lists
the tensor-parallel sizes vLLM accepts for a model (they divide the attention heads, and either divide
the KV heads or are a multiple of them, which vLLM meets by replicating KV heads); choose_layout() picks
TP within a node (the largest valid size that divides its GPUs), pipeline stages across nodes, expert
parallel for MoE models, and data-parallel copies for GPUs left over; check_layout() refuses a bad one in
one line naming the fix (ParallelError). gpu_plan() splits weights, KV cache and buffers per GPU and
compares them with gpu_memory_utilization x GPU memory, as vLLM does (it preallocates that share: weights,
activations, CUDA graphs and non-torch memory first, the rest becomes KV blocks), and says how many
sequences of the context the KV blocks hold. cluster() is the GPUs of all nodes as the one device a
whole-model plan is checked against; split_plan() lays such a plan out and splits it per GPU. commands()
prints the Ray cluster setup for several nodes, `qwenkit serve --engine vllm ...` and the equivalent raw
`vllm serve ...`. Estimates, not checked on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from qwenkit.catalog.formats import KV_BYTES, WeightFormat
from qwenkit.catalog.planner import GIB, MIB, Device, Engine, Plan, PlanError
from qwenkit.catalog.shape import ModelShape

CUDA_GRAPH_BYTES = 512 * MIB  # vLLM's captured decode graphs per GPU (its logs show 0.3-1 GiB)
NON_TORCH_BYTES = 768 * MIB  # CUDA context, cuBLAS workspaces, NCCL buffers: outside torch's allocator
NCCL_BYTES = 256 * MIB  # extra per GPU once tensor or pipeline parallel talks over NCCL
DEFAULT_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default
RAY_PORT = 6379


class ParallelError(PlanError):
    """A parallel layout vLLM cannot run; the message is one line naming the fix."""


@dataclass(frozen=True)
class Layout:
    """GPUs per node x nodes, split as tensor x pipeline x data parallel; expert parallel for MoE."""

    tp: int
    pp: int = 1
    dp: int = 1
    ep: bool = False
    nodes: int = 1
    gpus_per_node: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


def tp_sizes(shape: ModelShape, limit: int = 64) -> list[int]:
    """Tensor-parallel sizes up to `limit` that vLLM accepts for this model's attention heads."""
    return [
        tp
        for tp in range(1, limit + 1)
        if shape.heads % tp == 0 and (shape.kv_heads % tp == 0 or tp % shape.kv_heads == 0)
    ]


def _heads(shape: ModelShape) -> str:
    return f"{shape.name}'s {shape.heads} attention heads ({shape.kv_heads} KV heads)"


def check_layout(shape: ModelShape, layout: Layout, gpus_present: int | None = None) -> None:
    """Raise ParallelError when vLLM cannot run `layout`, naming the sizes that work."""
    if layout.tp < 1 or layout.pp < 1 or layout.dp < 1 or layout.nodes < 1:
        raise ParallelError("tensor, pipeline and data parallel sizes and --nodes must be at least 1")
    valid = tp_sizes(shape, max(layout.gpus_per_node, layout.tp))
    if layout.tp not in valid:
        raise ParallelError(
            f"--tensor-parallel {layout.tp} does not divide {_heads(shape)}: use "
            + ", ".join(str(t) for t in valid)
        )
    if layout.pp > shape.layers:
        raise ParallelError(f"--pipeline-parallel {layout.pp} exceeds {shape.name}'s {shape.layers} layers")
    total = layout.gpus_per_node * layout.nodes
    if layout.gpus > total:
        raise ParallelError(
            f"tensor {layout.tp} x pipeline {layout.pp} x data {layout.dp} needs {layout.gpus} GPUs but "
            f"{layout.nodes} node(s) x {layout.gpus_per_node} GPUs have {total}: lower the sizes or add nodes"
        )
    if gpus_present is not None and layout.gpus_per_node > gpus_present:
        raise ParallelError(
            f"--gpus {layout.gpus_per_node} but this machine has {gpus_present} GPU(s): "
            f"use --gpus {gpus_present}, or describe another machine with --memory"
        )
    if layout.ep and not shape.is_moe:
        raise ParallelError(f"expert parallel needs an MoE model and {shape.name} is dense: drop it")


def choose_layout(
    shape: ModelShape, gpus_per_node: int, nodes: int = 1, tp: int | None = None, pp: int | None = None
) -> Layout:
    """vLLM's advice: TP inside a node, PP across nodes; GPUs left over serve data-parallel copies."""
    if gpus_per_node < 1 or nodes < 1:
        raise ParallelError("--gpus and --nodes must be at least 1")
    if tp is None:
        tp = max(t for t in tp_sizes(shape, gpus_per_node) if gpus_per_node % t == 0)
    pp = pp or nodes
    dp = max(1, (gpus_per_node * nodes) // (tp * pp))
    layout = Layout(tp, pp, dp, shape.is_moe and tp * dp > 1, nodes, gpus_per_node)
    check_layout(shape, layout)
    return layout


@dataclass(frozen=True)
class GpuPlan:
    """Per-GPU memory of a vLLM plan, and what the KV blocks left at gpu_memory_utilization hold."""

    layout: Layout
    utilization: float
    gpu_bytes: int
    weights: int  # per GPU
    activations: int
    cuda_graphs: int
    non_torch: int
    kv_needed: int  # the plan's workload (context x concurrency), per GPU
    kv_room: int  # what vLLM will make KV blocks of
    kv_per_seq: int  # one full-context sequence, per GPU
    max_seqs: int  # sequences of the full context the KV blocks hold (per data-parallel copy)

    @property
    def fits(self) -> bool:
        return self.kv_room >= self.kv_needed and self.kv_room > 0

    @property
    def budget(self) -> int:
        return int(self.gpu_bytes * self.utilization)

    @property
    def required(self) -> int:
        """What the workload takes of each GPU (KV for the plan's sequences, not every block vLLM makes)."""
        return self.weights + self.activations + self.cuda_graphs + self.non_torch + self.kv_needed


def check_utilization(utilization: float) -> None:
    """ParallelError unless `utilization` is a share vLLM takes (its --gpu-memory-utilization)."""
    if not 0.05 <= utilization <= 1.0:
        raise ParallelError("--gpu-memory-utilization must be between 0.05 and 1.0 (vLLM's default: 0.9)")


def gpu_plan(
    p: Plan, layout: Layout, utilization: float = DEFAULT_UTILIZATION, cuda_graphs: bool = True
) -> GpuPlan:
    """Split plan `p` (vLLM, whole-model figures) over `layout`'s GPUs, one data-parallel copy each."""
    if p.engine is not Engine.VLLM:
        raise ParallelError(
            "multi-GPU plans are for the vLLM engine: use --device cuda and a bf16/fp8/AWQ format"
        )
    check_utilization(utilization)
    r, s, m = p.request, p.request.shape, p.memory
    shards = layout.tp * layout.pp
    weights = math.ceil(m.weights / shards)
    # Each GPU holds ceil(kv_heads / tp) KV heads (at least one: vLLM replicates them past kv_heads).
    kv_heads_per_gpu = max(1, math.ceil(s.kv_heads / layout.tp))
    share = kv_heads_per_gpu / s.kv_heads / layout.pp
    concurrency = max(1, math.ceil(r.concurrency / layout.dp))
    kv_token = s.kv_bytes_per_token(KV_BYTES[r.kv_type]) * share
    kv_per_seq = int(kv_token * p.n_ctx_seq) + math.ceil(m.recurrent / max(1, r.concurrency) / shards)
    kv_needed = kv_per_seq * concurrency
    activations = math.ceil(m.compute / layout.tp)
    non_torch = NON_TORCH_BYTES + (NCCL_BYTES if shards > 1 else 0)
    graphs = CUDA_GRAPH_BYTES if cuda_graphs else 0
    budget = int(r.device.total_bytes * utilization)
    room = budget - weights - activations - graphs - non_torch
    return GpuPlan(
        layout,
        utilization,
        r.device.total_bytes,
        weights,
        activations,
        graphs,
        non_torch,
        kv_needed,
        max(0, room),
        kv_per_seq,
        max(0, room) // kv_per_seq if kv_per_seq else 0,
    )


def cluster(gpu: Device, gpus: int, nodes: int = 1) -> Device:
    """`gpus` x `nodes` GPUs like `gpu` as one device (memory summed): what a whole-model plan needs."""
    if gpu.kind != "cuda":
        raise ValueError("--gpus/--nodes plan vLLM on CUDA GPUs: add --device cuda (and --memory per GPU)")
    if gpus < 1 or nodes < 1:
        raise ParallelError("--gpus and --nodes must be at least 1")
    return replace(gpu, total_bytes=gpu.total_bytes * gpus * nodes, available_bytes=None)


def split_plan(
    p: Plan,
    gpu_bytes: int,
    gpus: int,
    nodes: int = 1,
    tp: int | None = None,
    pp: int | None = None,
    utilization: float = DEFAULT_UTILIZATION,
) -> GpuPlan:
    """The per-GPU plan of `p` (a vLLM plan on the cluster of `gpus` x `nodes` GPUs of `gpu_bytes`)."""
    layout = choose_layout(p.request.shape, gpus, nodes, tp, pp)
    one_gpu = replace(p, request=replace(p.request, device=replace(p.request.device, total_bytes=gpu_bytes)))
    return gpu_plan(one_gpu, layout, utilization)


def _quant_flag(fmt: WeightFormat) -> str:
    # AWQ/GPTQ/fp8 repos say their method in config.json (vLLM reads it); bf16 weights quantized on load.
    return " --quantization fp8" if fmt is WeightFormat.FP8 and fmt.hf_dtype else ""


def commands(repo: str, p: Plan, g: GpuPlan, head: str = "HEAD_IP") -> list[str]:
    """The exact commands, in order: Ray on each node (several nodes), then qwenkit, then raw vLLM."""
    r, lay = p.request, g.layout
    out: list[str] = []
    parallel = f"--tensor-parallel {lay.tp}"
    raw_parallel = f"--tensor-parallel-size {lay.tp}"
    if lay.pp > 1:
        parallel += f" --pipeline-parallel {lay.pp}"
        raw_parallel += f" --pipeline-parallel-size {lay.pp}"
    if lay.dp > 1:
        parallel += f" --data-parallel {lay.dp}"
        raw_parallel += f" --data-parallel-size {lay.dp}"
    if lay.ep:
        raw_parallel += " --enable-expert-parallel"
    kv = " --kv-cache-dtype fp8" if r.kv_type == "fp8" else ""
    if r.shape.model_type == "qwen":
        kv += " --trust-remote-code"  # first-generation Qwen ships its modelling code
    util = f" --gpu-memory-utilization {g.utilization:g}" if g.utilization != DEFAULT_UTILIZATION else ""
    ray = ""
    if lay.nodes > 1:
        gpus = f"--num-gpus {lay.gpus_per_node}"
        out.append(f"# node 0 (head): ray start --head --port {RAY_PORT} {gpus}")
        out.append(f"# nodes 1..{lay.nodes - 1}: ray start --address {head}:{RAY_PORT} {gpus}")
        ray = f" --ray-address {head}:{RAY_PORT}"
        raw_parallel += " --distributed-executor-backend ray"
    out.append(
        f"qwenkit serve --engine vllm --model {repo} {parallel} --ctx {p.n_ctx} "
        f"--max-seqs {r.concurrency}{util}{ray}"
    )
    out.append(
        f"vllm serve {repo} {raw_parallel} --max-model-len {p.n_ctx_seq} --max-num-seqs {r.concurrency}"
        f"{kv}{util}{_quant_flag(r.weight_format)} --reasoning-parser qwen3"
    )
    return out


def describe(g: GpuPlan) -> list[str]:
    """Lines for the plan printout: per-GPU memory and the KV capacity it leaves."""
    lay = g.layout

    def gib(n: int) -> str:
        return f"{n / GIB:.2f} GiB"

    layout = f"{lay.nodes} node(s) x {lay.gpus_per_node} GPU(s): tensor {lay.tp} x pipeline {lay.pp}"
    if lay.dp > 1:
        layout += f" x data {lay.dp}"
    if lay.ep:
        layout += ", experts split across GPUs (expert parallel)"
    return [
        layout,
        f"per GPU: {gib(g.budget)} usable ({g.utilization:.0%} of {gib(g.gpu_bytes)}) = weights "
        f"{gib(g.weights)} + activations {gib(g.activations)} + CUDA graphs {gib(g.cuda_graphs)} + "
        f"non-torch {gib(g.non_torch)} + KV blocks {gib(g.kv_room)}",
        f"KV per GPU: workload needs {gib(g.kv_needed)}; the blocks hold {g.max_seqs} sequences of the full "
        "context per copy",
    ]


__all__ = [
    "GpuPlan",
    "Layout",
    "ParallelError",
    "check_layout",
    "check_utilization",
    "choose_layout",
    "cluster",
    "commands",
    "describe",
    "gpu_plan",
    "split_plan",
    "tp_sizes",
]
