"""`qwenkit select`: the cases that must come out sensibly, the numbers behind them, the commands."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from qwenkit import hardware
from qwenkit.catalog import load_catalog
from qwenkit.catalog.formats import WeightFormat
from qwenkit.catalog.planner import GIB, MIB, SERVE_STATE_CACHE_MB, Device, Engine
from qwenkit.catalog.select import SelectRequest, select_models
from qwenkit.catalog.shape import VISION_LAYOUTS
from qwenkit.cli import app as main_app
from qwenkit.cli import plan as plan_cli

PHONE_MODELS = {
    "Qwen2.5-0.5B-Instruct",
    "Qwen2.5-1.5B-Instruct",
    "Qwen3-0.6B",
    "Qwen3-1.7B",
    "Qwen3.5-0.8B",
    "Qwen3.5-2B",
}


@pytest.fixture(scope="module")
def catalog():  # type: ignore[no-untyped-def]
    return load_catalog()


def _select(catalog, task: str, kind: str, gib: float, **kw):  # type: ignore[no-untyped-def]
    return select_models(catalog, SelectRequest(task, Device(kind, int(gib * GIB)), **kw))  # type: ignore[arg-type]


def test_everything_recommended_fits_its_budget(catalog) -> None:  # type: ignore[no-untyped-def]
    for task, kind, gib in (("chat", "cpu", 8), ("code", "cuda", 24), ("vision", "cuda", 24)):
        recs = _select(catalog, task, kind, gib)
        assert recs
        for rec in recs:
            assert rec.plan.fits and rec.plan.memory.required <= rec.plan.budget
            assert rec.plan.request.context == 4096 and rec.plan.request.concurrency == 1
            assert rec.reason and " — gives up: " in rec.reason


def test_phone_class_device_gets_a_small_quantized_model(catalog) -> None:  # type: ignore[no-untyped-def]
    recs = _select(catalog, "chat", "cpu", 4)
    top = recs[0]
    assert top.entry.name in PHONE_MODELS
    assert top.weight_format.is_gguf and top.weight_format not in (
        WeightFormat.F32,
        WeightFormat.FP16,
        WeightFormat.BF16,
    )
    assert all(r.entry.shape().params_total < 4e9 for r in recs)


CODERS = {"qwen2.5-coder", "qwen3-coder"}
TODAY = {"qwen3.5", "qwen3.6", "qwen3.8"}  # the Gated DeltaNet generation (2026)


def test_code_goes_to_a_coder_or_todays_generation(catalog) -> None:  # type: ignore[no-untyped-def]
    for kind, gib in (("cpu", 16), ("cuda", 24)):
        assert _select(catalog, "code", kind, gib)[0].entry.family_key in CODERS | TODAY
    # At 4 GB: a small coder, or Qwen3.5-2B (today's generation), never an older general model.
    assert _select(catalog, "code", "cpu", 4)[0].entry.family_key in CODERS | TODAY


@pytest.mark.parametrize(
    ("task", "kind"), [("chat", "cpu"), ("code", "cpu"), ("chat", "cuda"), ("code", "cuda")]
)
def test_8gb_gets_todays_best_fit_with_the_reason(catalog, task: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    top = _select(catalog, task, kind, 8)[0]
    assert top.entry.family_key in {"qwen3.5", "qwen3.6"}, top.entry.name
    assert top.entry.model.arch.hybrid and top.weight_format.is_gguf and top.engine is Engine.LLAMACPP
    assert "Gated DeltaNet" in top.reason and " — gives up: " in top.reason
    # The plan behind it carries the hybrid parts: KV on a quarter of the layers plus the recurrent state.
    shape = top.plan.request.shape
    assert top.plan.memory.recurrent == shape.recurrent_state_bytes_per_seq() > 0
    assert shape.kv_layers * 4 == shape.layers
    # The plan is for the recommended `qwenkit serve`: its saved-state cache shares a CPU's memory.
    cache_mb = top.plan.request.state_cache_mb
    assert top.plan.memory.state_cache == (cache_mb * MIB if kind == "cpu" else 0)
    assert (f"--state-cache-mb {cache_mb}" in top.command) == (cache_mb != SERVE_STATE_CACHE_MB)


def test_math_goes_to_math_or_qwen3_thinking(catalog) -> None:  # type: ignore[no-untyped-def]
    for kind, gib in (("cpu", 16), ("cuda", 80)):
        top = _select(catalog, "math", kind, gib)[0]
        assert top.entry.family.specialty == "math" or top.entry.capabilities.thinking


def test_images_go_to_vl(catalog) -> None:  # type: ignore[no-untyped-def]
    for kind, gib in (("cuda", 24), ("cpu", 16)):
        recs = _select(catalog, "vision", kind, gib)
        assert recs and all("image" in r.entry.modalities for r in recs)
    # On a CPU, the families qwenkit converts whole (Qwen3.5) run on its llama.cpp engine with the vision
    # tower converted (--mmproj auto; the projector and its encoder buffer are in the plan); others on vLLM.
    cpu = _select(catalog, "vision", "cpu", 16)
    ours = [r for r in cpu if r.engine is Engine.LLAMACPP]
    assert ours and all(r.entry.model.arch.type in ("qwen3_5", "qwen3_5_moe") for r in ours)
    for r in ours:
        assert r.plan.request.images and r.weight_format is WeightFormat.Q8_0
        assert r.command.startswith("qwenkit serve --model Qwen/Qwen3.5")
        assert "--quant q8_0" in r.command and "--mmproj auto" in r.command
    sized = next(r for r in ours if r.entry.name == "Qwen3.5-4B")  # its vision tower is in the catalog
    assert sized.plan.memory.vision > 0 and sized.plan.memory.vision_compute > 0
    assert all(r.engine is Engine.VLLM for r in cpu if r not in ours)
    assert _select(catalog, "vision", "cuda", 24)[0].entry.family_key == "qwen2.5-vl"


def test_audio_goes_to_qwen2_audio(catalog) -> None:  # type: ignore[no-untyped-def]
    assert [r.entry.name for r in _select(catalog, "audio", "cuda", 24)] == ["Qwen2-Audio-7B-Instruct"]


def test_32gb_gpu_quality_first_is_32b_class_quantized_or_30b_a3b(catalog) -> None:  # type: ignore[no-untyped-def]
    top = _select(catalog, "chat", "cuda", 32)[0]
    total = top.entry.shape().params_total / 1e9
    assert top.entry.name == "Qwen3-30B-A3B" or (
        27 <= total <= 36 and top.weight_format is not WeightFormat.BF16
    )


def test_latency_prefers_the_moe_on_a_gpu(catalog) -> None:  # type: ignore[no-untyped-def]
    top = _select(catalog, "chat", "cuda", 32, prefer="latency")[0]
    assert top.entry.is_moe and top.entry.shape().params_active < 5e9, top.entry.name


def test_long_context_needs_a_model_that_reaches_it(catalog) -> None:  # type: ignore[no-untyped-def]
    recs = _select(catalog, "long-context", "cuda", 80, context=524288, top=20)
    assert recs and "qwen2.5-1m" in {r.entry.family_key for r in recs}
    for r in recs:
        assert r.plan.request.context == 524288 and r.entry.shape().max_context >= 524288


def test_nothing_fits_gives_nothing(catalog) -> None:  # type: ignore[no-untyped-def]
    assert _select(catalog, "chat", "cpu", 0.25) == []


def test_adjustments_say_what_changed(catalog) -> None:  # type: ignore[no-untyped-def]
    recs = _select(catalog, "chat", "cpu", 4, top=10) + _select(catalog, "chat", "cuda", 32, top=10)
    assert any(r.adjustments for r in recs) and any(not r.adjustments for r in recs)
    for rec in recs:
        kv = rec.plan.request.kv_type
        said = " ".join(rec.adjustments)
        assert (kv != "f16") == ("KV cache" in said), rec.entry.name
        if rec.engine is Engine.LLAMACPP:  # on by default (llama.cpp's auto): never an adjustment
            assert rec.plan.flash_attn and "flash attention" not in said, rec.entry.name
            # The command serves the KV cache the plan counted.
            assert (kv == "q8_0") == ("--kv q8_0" in rec.command), rec.command


def test_commands_use_real_flags(catalog) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    serve_help = runner.invoke(main_app.app, ["serve", "--help"], terminal_width=200).output
    quantize_help = runner.invoke(main_app.app, ["quantize", "--help"], terminal_width=200).output
    recs = _select(catalog, "chat", "cpu", 8, top=10) + _select(catalog, "chat", "cuda", 32, top=10)
    seen = set()
    for rec in recs:
        parts = rec.command.split(" && ")
        for part in parts:
            words = part.split()
            if words[:2] == ["qwenkit", "serve"]:
                help_text = serve_help
            elif words[:2] == ["qwenkit", "quantize"]:
                help_text = quantize_help
            else:
                assert words[0] == "vllm" and rec.engine is Engine.VLLM
                continue
            seen.add(words[1])
            for flag in (w for w in words if w.startswith("-")):
                assert flag in help_text, (rec.command, flag)
        assert rec.entry.model.hf in rec.command or any(
            repo in rec.command for repo in rec.entry.model.quantized.values()
        )
    assert seen == {"serve", "quantize"}


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("select")(plan_cli.select_command)
    app.command("other")(lambda: None)
    return app


def test_cli_select_table_and_json() -> None:
    runner = CliRunner()
    table = runner.invoke(_app(), ["select", "--memory", "4GB", "--device", "cpu"], terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "run: qwenkit" in table.output and "gives up" in table.output
    data = json.loads(
        runner.invoke(
            _app(), ["select", "--task", "code", "--memory", "24GB", "--device", "cuda", "--json"]
        ).output
    )
    assert data[0]["family"] in CODERS | TODAY
    assert {"model", "weight_format", "engine", "reason", "command", "plan"} <= set(data[0])
    assert data[0]["plan"]["memory_bytes"]["required"] <= data[0]["plan"]["budget_bytes"]


def test_cli_select_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    bad = runner.invoke(_app(), ["select", "--task", "poetry", "--memory", "8GB"])
    assert bad.exit_code == 2 and "unknown task 'poetry'" in bad.output
    tiny = runner.invoke(_app(), ["select", "--memory", "256MB"])
    assert tiny.exit_code == 2 and "no Qwen model fits" in tiny.output and "Traceback" not in tiny.output
    monkeypatch.setattr(hardware, "gpus", lambda use_torch=True: [])
    nogpu = runner.invoke(_app(), ["select", "--device", "cuda"])
    assert nogpu.exit_code == 2 and "no CUDA GPU found" in nogpu.output


# ---- several GPUs (and nodes): vLLM with a parallel layout ------------------------------------------------
def _on_gpus(catalog, task: str, gpus: int, gib: float, nodes: int = 1, **kw):  # type: ignore[no-untyped-def]
    gpu = Device("cuda", int(gib * GIB), None, 3350.0, None, "described")
    return select_models(catalog, SelectRequest(task, gpu, gpus=gpus, nodes=nodes, **kw))


def _serve_flags() -> str:
    # Wide enough that rich prints every option name whole.
    return CliRunner().invoke(main_app.app, ["serve", "--help"], env={"COLUMNS": "250"}).output


def _check_gpu_recs(recs, gpus: int, nodes: int = 1) -> None:  # type: ignore[no-untyped-def]
    serve_help = _serve_flags()
    assert recs
    for rec in recs:
        g, shape = rec.gpu, rec.plan.request.shape
        assert rec.engine is Engine.VLLM and g is not None and g.fits, rec.entry.name
        assert shape.heads % g.layout.tp == 0 and gpus % g.layout.tp == 0  # TP divides the heads and a node
        assert g.layout.gpus == gpus * nodes and g.required <= g.budget
        assert g.weights * g.layout.tp * g.layout.pp >= rec.plan.memory.weights  # each GPU holds its share
        if rec.command.startswith("qwenkit serve --engine vllm"):
            assert f"--tensor-parallel {g.layout.tp}" in rec.command
            for flag in (w for w in rec.command.split() if w.startswith("--")):
                assert flag in serve_help, (rec.command, flag)
        else:  # images / fp8 KV / a vision tower: vLLM's own server, with the same layout
            assert (
                rec.command.startswith("vllm serve ")
                and f"--tensor-parallel-size {g.layout.tp}" in rec.command
            )


def test_eight_80gb_gpus_offer_a_large_moe_on_vllm(catalog) -> None:  # type: ignore[no-untyped-def]
    recs = _on_gpus(catalog, "chat", 8, 80)
    _check_gpu_recs(recs, 8)
    top = recs[0]
    assert top.entry.is_moe and top.entry.shape().params_total > 100e9, top.entry.name
    assert top.gpu is not None and (top.gpu.layout.tp, top.gpu.layout.ep) == (8, True)
    assert top.command.startswith(
        f"qwenkit serve --engine vllm --model {top.entry.model.hf} --tensor-parallel 8"
    )
    assert top.setup == ()
    # The same MoE does not fit one of those GPUs: the layout is what makes it an offer.
    assert top.entry.name not in {r.entry.name for r in _on_gpus(catalog, "chat", 1, 80, top=50)}


def test_one_24gb_gpu_offers_what_fits_it(catalog) -> None:  # type: ignore[no-untyped-def]
    recs = _on_gpus(catalog, "chat", 1, 24)
    _check_gpu_recs(recs, 1)
    assert all(r.gpu.layout.tp == 1 and r.gpu.layout.dp == 1 for r in recs)
    assert all(r.gpu.budget == int(24 * GIB * 0.9) for r in recs)
    half = _on_gpus(catalog, "chat", 1, 24, gpu_memory_utilization=0.5)
    _check_gpu_recs(half, 1)
    assert all("--gpu-memory-utilization 0.5" in r.command for r in half)


def test_gpus_no_tensor_size_fits_serve_copies(catalog) -> None:  # type: ignore[no-untyped-def]
    recs = _on_gpus(catalog, "chat", 3, 24)  # no Qwen's heads split three ways: TP 1, three copies
    _check_gpu_recs(recs, 3)
    assert all((r.gpu.layout.tp, r.gpu.layout.dp) == (1, 3) for r in recs)
    assert all("--data-parallel 3" in r.command for r in recs if r.command.startswith("qwenkit"))


def test_two_nodes_start_ray_then_serve(catalog) -> None:  # type: ignore[no-untyped-def]
    recs = _on_gpus(catalog, "chat", 8, 80, nodes=2)
    _check_gpu_recs(recs, 8, nodes=2)
    for rec in recs:
        assert rec.gpu.layout.pp == 2 and rec.setup[0].startswith("# node 0 (head): ray start --head")
        ours = rec.command.startswith("qwenkit")
        assert ("--ray-address HEAD_IP:6379" if ours else "--distributed-executor-backend ray") in rec.command
    vision = _on_gpus(catalog, "vision", 4, 24)
    _check_gpu_recs(vision, 4)
    # Images: qwenkit's server on vLLM for the vision towers it sizes, vLLM's own server for the others.
    ours = [r.command.startswith("qwenkit") for r in vision]
    assert ours == [r.plan.request.shape.model_type in VISION_LAYOUTS for r in vision] and any(ours)


def test_gpus_need_a_cuda_device_and_at_least_one() -> None:
    with pytest.raises(ValueError, match="add --device cuda"):
        SelectRequest("chat", Device("cpu", 64 * GIB), gpus=2)
    with pytest.raises(ValueError, match="at least 1"):
        SelectRequest("chat", Device("cuda", 80 * GIB), gpus=0)
    with pytest.raises(ValueError, match=r"between 0\.05 and 1\.0"):
        SelectRequest("chat", Device("cuda", 80 * GIB), gpus=1, gpu_memory_utilization=1.5)


def test_cli_select_on_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    described = ["select", "--device", "cuda", "--memory", "80GB"]
    data = json.loads(runner.invoke(_app(), [*described, "--gpus", "8", "--top", "2", "--json"]).output)
    assert data[0]["engine"] == "vllm" and data[0]["gpu"]["layout"]["tensor_parallel"] == 8
    assert data[0]["gpu"]["fits"] and data[0]["gpu"]["commands"][-1] == data[0]["command"]
    table = runner.invoke(
        _app(), [*described, "--gpus", "8", "--nodes", "2", "--top", "2"], terminal_width=250
    )
    assert table.exit_code == 0, table.output
    assert "tensor 8 x pipeline 2" in table.output and "ray start --head" in table.output
    assert "/GPU" in table.output and "run: " in table.output


def test_cli_select_gpu_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    described = ["select", "--device", "cuda", "--memory", "80GB"]
    # One line each: no GPUs, GPUs on a CPU, nothing fits the GPUs given, more GPUs than this machine has.
    zero = runner.invoke(_app(), [*described, "--gpus", "0"])
    assert zero.exit_code == 2 and "--gpus" in zero.output and "Traceback" not in zero.output
    cpu = runner.invoke(_app(), ["select", "--memory", "80GB", "--gpus", "2"])
    assert cpu.exit_code == 2 and "add --device cuda" in cpu.output
    tiny = runner.invoke(_app(), ["select", "--device", "cuda", "--memory", "1GB", "--gpus", "1"])
    assert tiny.exit_code == 2 and "on 1 node(s) × 1 GPU(s)" in tiny.output and "more --gpus" in tiny.output
    four = [hardware.GPU("H100", 80 * GIB, 79 * GIB, "nvidia-smi", "9.0")] * 4
    monkeypatch.setattr(hardware, "gpus", lambda use_torch=True: four)
    more = runner.invoke(_app(), ["select", "--device", "cuda", "--gpus", "8"])
    assert more.exit_code == 2 and "this machine has 4 GPU(s): use --gpus 4" in more.output
    # A probed machine with several GPUs is planned on all of them.
    probed = json.loads(runner.invoke(_app(), ["select", "--device", "cuda", "--top", "1", "--json"]).output)
    assert probed[0]["gpu"]["layout"]["gpus_per_node"] == 4
