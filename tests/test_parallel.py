"""vLLM plans past one GPU: tensor-parallel sizes against the heads, the layout on GPUs and nodes, the
memory each GPU needs at gpu_memory_utilization, the exact commands, and `qwenkit plan --gpus/--nodes`."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from qwenkit import hardware
from qwenkit.catalog import load_catalog
from qwenkit.catalog.formats import WeightFormat
from qwenkit.catalog.parallel import (
    CUDA_GRAPH_BYTES,
    Layout,
    ParallelError,
    check_layout,
    choose_layout,
    commands,
    gpu_plan,
    tp_sizes,
)
from qwenkit.catalog.planner import GIB, Device, Engine, PlanRequest, plan
from qwenkit.catalog.shape import ModelShape
from qwenkit.cli import app as main_app

GPU_80 = Device("cuda", 80 * GIB, None, 3350.0, None, "described")


@pytest.fixture(scope="module")
def shapes() -> dict[str, ModelShape]:
    catalog = load_catalog()
    names = ("Qwen3-235B-A22B", "Qwen3-8B", "Qwen2.5-72B-Instruct")
    return {name: catalog.get(name).shape() for name in names}  # type: ignore[union-attr]


def whole(shape: ModelShape, gpus: int, context: int = 8192, concurrency: int = 16, kv: str = "f16"):  # type: ignore[no-untyped-def]
    device = Device("cuda", GPU_80.total_bytes * gpus, None, None, None, "described")
    request = PlanRequest(shape, WeightFormat.BF16, context, concurrency, device, kv, engine=Engine.VLLM)
    return plan(request, suggest=False)


def test_tensor_parallel_sizes_follow_the_heads(shapes: dict[str, ModelShape]) -> None:
    big = shapes["Qwen3-235B-A22B"]  # 64 heads, 4 KV heads: 8 replicates each KV head on 2 GPUs
    assert tp_sizes(big, 16) == [1, 2, 4, 8, 16]
    assert tp_sizes(shapes["Qwen3-8B"], 8) == [1, 2, 4, 8]
    with pytest.raises(ParallelError, match="--tensor-parallel 3 does not divide") as info:
        check_layout(big, Layout(3, gpus_per_node=8))
    assert "use 1, 2, 4, 8" in str(info.value) and "\n" not in str(info.value)


def test_layout_is_tp_in_a_node_pp_across_nodes(shapes: dict[str, ModelShape]) -> None:
    moe = choose_layout(shapes["Qwen3-235B-A22B"], gpus_per_node=8, nodes=2)
    assert (moe.tp, moe.pp, moe.dp, moe.ep, moe.gpus) == (8, 2, 1, True, 16)
    dense = choose_layout(shapes["Qwen3-8B"], gpus_per_node=8)
    assert (dense.tp, dense.pp, dense.dp, dense.ep) == (8, 1, 1, False)
    small = choose_layout(shapes["Qwen3-8B"], gpus_per_node=8, tp=2)  # the GPUs left serve copies
    assert (small.tp, small.dp) == (2, 4)
    with pytest.raises(ParallelError, match="needs 32 GPUs"):
        check_layout(shapes["Qwen3-8B"], Layout(8, 4, gpus_per_node=8, nodes=2))
    with pytest.raises(ParallelError, match="this machine has 2 GPU"):
        check_layout(shapes["Qwen3-8B"], Layout(4, gpus_per_node=4), gpus_present=2)
    with pytest.raises(ParallelError, match="dense"):
        check_layout(shapes["Qwen3-8B"], Layout(2, ep=True, gpus_per_node=2))


def test_each_gpu_holds_its_share(shapes: dict[str, ModelShape]) -> None:
    shape = shapes["Qwen2.5-72B-Instruct"]  # 8 KV heads
    p = whole(shape, 8)
    one = p.request.device.total_bytes // 8
    per_gpu = replace(p, request=replace(p.request, device=GPU_80))
    g4 = gpu_plan(per_gpu, Layout(4, gpus_per_node=4))
    g8 = gpu_plan(per_gpu, Layout(8, gpus_per_node=8))
    assert g4.weights == math.ceil(p.memory.weights / 4) and g8.weights == math.ceil(p.memory.weights / 8)
    assert g8.kv_needed * 2 == pytest.approx(g4.kv_needed, rel=1e-6)  # KV heads split while tp <= 8
    assert g8.budget == int(one * 0.9) and g8.cuda_graphs == CUDA_GRAPH_BYTES
    assert g8.kv_room == g8.budget - g8.weights - g8.activations - g8.cuda_graphs - g8.non_torch
    assert g8.max_seqs == g8.kv_room // g8.kv_per_seq and g8.fits
    # Past the KV heads vLLM replicates them: tensor 16 does not halve a GPU's KV again.
    g16 = gpu_plan(per_gpu, Layout(16, gpus_per_node=16))
    assert g16.kv_per_seq == g8.kv_per_seq and g16.weights < g8.weights
    assert not gpu_plan(per_gpu, Layout(4, gpus_per_node=4), utilization=0.5).fits  # 36 GiB each < 40


def test_commands_are_exact(shapes: dict[str, ModelShape]) -> None:
    shape = shapes["Qwen3-235B-A22B"]
    p = whole(shape, 16, context=8192, concurrency=4)
    layout = choose_layout(shape, 8, 2)
    g = gpu_plan(p, layout)
    ray_head, ray_worker, ours, raw = commands("Qwen/Qwen3-235B-A22B", p, g, head="10.0.0.1")
    assert ray_head == "# node 0 (head): ray start --head --port 6379 --num-gpus 8"
    assert ray_worker == "# nodes 1..1: ray start --address 10.0.0.1:6379 --num-gpus 8"
    assert ours == (
        "qwenkit serve --engine vllm --model Qwen/Qwen3-235B-A22B --tensor-parallel 8 --pipeline-parallel 2 "
        "--ctx 32768 --max-seqs 4 --ray-address 10.0.0.1:6379"
    )
    assert raw == (
        "vllm serve Qwen/Qwen3-235B-A22B --tensor-parallel-size 8 --pipeline-parallel-size 2 "
        "--enable-expert-parallel --distributed-executor-backend ray --max-model-len 8192 --max-num-seqs 4 "
        "--reasoning-parser qwen3"
    )


def test_cli_plan_on_two_nodes_prints_the_commands() -> None:
    runner = CliRunner()
    args = ["plan", "Qwen3-235B-A22B", "--device", "cuda", "--memory", "80GB", "--gpus", "8", "--nodes", "2"]
    result = runner.invoke(main_app.app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    gpu = out["gpu"]
    assert gpu["layout"]["tensor_parallel"] == 8 and gpu["layout"]["pipeline_parallel"] == 2
    assert gpu["layout"]["expert_parallel"] is True and gpu["fits"] is True
    assert out["command"] == gpu["commands"][-2] and out["command"].startswith("qwenkit serve --engine vllm")
    # Every flag of the qwenkit command is one `qwenkit serve` has.
    serve_help = runner.invoke(main_app.app, ["serve", "--help"], terminal_width=200).output
    for flag in (w for w in out["command"].split() if w.startswith("--")):
        assert flag in serve_help, flag
    shown = runner.invoke(main_app.app, args, terminal_width=200)
    assert shown.exit_code == 0 and "vllm serve Qwen/Qwen3-235B-A22B --tensor-parallel-size 8" in shown.output


def test_cli_plan_bad_layouts_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    base = ["plan", "Qwen3-8B", "--device", "cuda", "--memory", "80GB"]
    bad_tp = runner.invoke(main_app.app, [*base, "--gpus", "4", "--tensor-parallel", "3"])
    assert bad_tp.exit_code == 2 and "--tensor-parallel 3 does not divide" in bad_tp.output
    assert "use 1, 2, 4" in bad_tp.output and "Traceback" not in bad_tp.output
    cpu = runner.invoke(main_app.app, ["plan", "Qwen3-8B", "--memory", "64GB", "--gpus", "2"])
    assert cpu.exit_code == 2 and "--device cuda" in cpu.output
    two = [hardware.GPU("H100", 80 * GIB, 79 * GIB, "nvidia-smi", "9.0")] * 2
    monkeypatch.setattr(hardware, "gpus", lambda use_torch=True: two)
    more = runner.invoke(main_app.app, ["plan", "Qwen3-8B", "--device", "cuda", "--gpus", "8"])
    assert more.exit_code == 2 and "this machine has 2 GPU(s): use --gpus 2" in more.output


def test_select_on_a_gpu_offers_qwenkit_on_vllm() -> None:
    from qwenkit.catalog.select import SelectRequest, select_models
    from qwenkit.catalog.shape import VISION_LAYOUTS

    def served_by_qwenkit(r) -> bool:  # type: ignore[no-untyped-def]
        shape = r.plan.request.shape  # text, or a vision tower qwenkit sizes; no fp8 KV cache
        return (
            not shape.encoder_params or shape.model_type in VISION_LAYOUTS
        ) and r.plan.request.kv_type != "fp8"

    gpu = Device("cuda", 80 * GIB, None, 3350.0, None, "described")
    recs = select_models(load_catalog(), SelectRequest("chat", gpu, top=5))
    on_vllm = [r for r in recs if r.plan.engine is Engine.VLLM]
    assert on_vllm and any(served_by_qwenkit(r) for r in on_vllm), [r.command for r in recs]
    vision = select_models(load_catalog(), SelectRequest("vision", gpu, top=5))
    for rec in on_vllm + vision:  # an audio tower, Qwen2-VL or an fp8 KV cache: vLLM's own server
        ours = served_by_qwenkit(rec)
        assert rec.command.startswith("qwenkit serve --engine vllm --model " if ours else "vllm serve"), (
            rec.command
        )
    assert any(r.command.startswith("qwenkit") for r in vision)  # images on qwenkit's vLLM engine
