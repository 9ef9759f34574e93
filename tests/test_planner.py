"""The memory planner: exact GGUF layouts, the KV formula, verdicts and changes, and predicted peak RSS
within 10% of what the engine really uses (measured in fresh processes on the demo checkpoints)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from qwenkit import hardware
from qwenkit.catalog import load_catalog, parse_format
from qwenkit.catalog.formats import WeightFormat, repack_types, weight_layout
from qwenkit.catalog.measure import measure_engine_run, measure_runtime_baseline
from qwenkit.catalog.planner import GIB, MIB, Device, Engine, PlanError, PlanRequest, Verdict, plan
from qwenkit.catalog.shape import ModelShape
from qwenkit.catalog.target import TargetError, resolve_target
from qwenkit.cli import plan as plan_cli
from qwenkit.gguf.reader import MetadataReader

BIG_CPU = Device("cpu", 64 * GIB, 48 * GIB, 20.0, frozenset({"avx2"}), "test box")


@pytest.fixture(scope="module")
def catalog():  # type: ignore[no-untyped-def]
    return load_catalog()


@pytest.fixture(scope="module")
def quantized(demo_gguf: Callable[[str, str, str], Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """quantized(arch, size, qtype) → a demo GGUF quantized by llama.cpp, once per module."""
    from qwenkit.gguf.quantize import quantize_gguf

    made: dict[tuple[str, str, str], Path] = {}

    def get(arch: str, size: str, qtype: str) -> Path:
        if (arch, size, qtype) not in made:
            out = tmp_path_factory.mktemp("quant") / f"{arch}-{size}-{qtype}.gguf"
            made[(arch, size, qtype)] = quantize_gguf(demo_gguf(arch, size, "f16"), out, qtype)  # type: ignore[arg-type]
        return made[(arch, size, qtype)]

    return get


def _request(shape: ModelShape, fmt: str, **kw) -> PlanRequest:  # type: ignore[no-untyped-def]
    base = {"context": 4096, "concurrency": 1, "device": BIG_CPU}
    return PlanRequest(shape=shape, weight_format=parse_format(fmt), **(base | kw))


# ---- layouts: byte-exact against files written by qwenkit's converter and llama.cpp's quantizer ----
@pytest.mark.parametrize(
    ("arch", "size", "fmt"),
    [
        # Files the other tests here need anyway, so checking them costs little.
        ("qwen3", "tiny", "q8_0"),
        ("qwen2", "small", "q8_0"),
        ("qwen3_moe", "small", "f16"),
        ("qwen3", "tiny", "q4_k_m"),  # 64-wide rows: every k-quant falls back
        ("qwen3", "small", "q4_k_m"),  # "more bits" for some attn_v and ffn_down
        ("qwen2", "small", "q4_0"),
        ("qwen3_moe", "small", "q4_k_m"),  # experts, and llama.cpp's 8-expert rules
        pytest.param("qwen2", "small", "q6_k", marks=pytest.mark.slow),
    ],
)
def test_weight_layout_matches_the_gguf_file(demo_checkpoint, demo_gguf, quantized, arch, size, fmt) -> None:  # type: ignore[no-untyped-def]
    path = demo_gguf(arch, size, fmt) if fmt in ("f32", "f16", "q8_0") else quantized(arch, size, fmt)
    config = json.loads((demo_checkpoint(arch, size) / "config.json").read_text())
    predicted = {
        t.tensor.name: (t.dtype, t.nbytes)
        for t in weight_layout(ModelShape.from_config(config), parse_format(fmt))
    }
    actual = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in MetadataReader(path).tensors}
    assert predicted == actual


def test_kv_cache_formula(catalog) -> None:  # type: ignore[no-untyped-def]
    shape = catalog.get("Qwen2.5-7B-Instruct").shape()
    p = plan(_request(shape, "q4_k_m", context=32768, concurrency=2))
    assert (
        p.memory.kv_cache == 28 * 4 * 128 * 2 * 2 * 32768 * 2
    )  # layers × KV heads × dim × K,V × bytes × cells
    q8 = plan(_request(shape, "q4_k_m", context=32768, concurrency=2, kv_type="q8_0"))
    assert q8.memory.kv_cache == p.memory.kv_cache * 34 // 64
    assert q8.flash_attn  # llama.cpp quantizes V only with flash attention


def test_llamacpp_pads_sequences_like_llama_cpp(catalog) -> None:  # type: ignore[no-untyped-def]
    p = plan(_request(catalog.get("Qwen3-0.6B").shape(), "q8_0", context=1000, concurrency=3))
    assert (p.n_ctx_seq, p.n_ctx) == (1024, 3072)


def test_moe_memory_holds_everything_speed_reads_the_active_part(catalog) -> None:  # type: ignore[no-untyped-def]
    moe = plan(_request(catalog.get("Qwen3-30B-A3B").shape(), "q4_k_m"))
    dense = plan(_request(catalog.get("Qwen3-32B").shape(), "q4_k_m"))
    assert moe.memory.weights > 0.85 * dense.memory.weights
    assert moe.speed.bytes_per_token < 0.2 * dense.speed.bytes_per_token
    assert moe.speed.single_tok_s == pytest.approx(20e9 / moe.speed.bytes_per_token)
    assert any("MoE" in n for n in moe.notes)


def test_repack_counts_once_as_reclaimable(catalog) -> None:  # type: ignore[no-untyped-def]
    shape = catalog.get("Qwen2.5-1.5B-Instruct").shape()
    q4 = plan(_request(shape, "q4_0"))
    assert q4.memory.repacked > 0.6 * q4.memory.weights and q4.memory.reclaimable == q4.memory.repacked
    assert q4.memory.required == q4.memory.peak - q4.memory.repacked
    q6 = plan(_request(shape, "q6_k"))
    assert q6.memory.repacked == 0
    assert repack_types(frozenset({"sse4_2"})) == frozenset()
    assert "Q8_0" in repack_types(None)  # an unprobed device: assume the most


def test_flash_attention_removes_the_score_matrix(catalog) -> None:  # type: ignore[no-untyped-def]
    shape = catalog.get("Qwen2.5-7B-Instruct").shape()
    slow = plan(_request(shape, "q4_k_m", context=32768))
    fast = plan(_request(shape, "q4_k_m", context=32768, flash_attn=True))
    scores = 4 * shape.heads * 32768 * 512  # f32 heads × n_kv × n_batch
    assert slow.memory.compute - fast.memory.compute > scores
    assert any("flash attention would save" in n for n in slow.notes)


def test_verdicts_changes_and_floor(catalog) -> None:  # type: ignore[no-untyped-def]
    shape = catalog.get("Qwen3-8B").shape()
    laptop = Device("cpu", 12 * GIB, None, None, None, "laptop")
    assert plan(_request(shape, "q4_k_m", device=laptop)).verdict is Verdict.FITS
    tight = plan(_request(shape, "q8_0", device=laptop, context=32768, concurrency=2))
    assert tight.verdict is Verdict.FITS_WITH_CHANGES and not tight.fits
    assert tight.changes and all(c.plan.fits for c in tight.changes)
    assert any("context" in c.summary or "q4" in c.summary or "KV" in c.summary for c in tight.changes)
    phone = Device("cpu", 2 * GIB, None, None, None, "phone")
    hopeless = plan(_request(catalog.get("Qwen3-235B-A22B").shape(), "q4_k_m", device=phone))
    assert hopeless.verdict is Verdict.DOES_NOT_FIT and not hopeless.changes
    assert any(n.startswith("even at q4_0") for n in hopeless.notes)


def test_budget_rules() -> None:
    described = Device("cpu", 16 * GIB)
    budget, why = described.budget()
    assert budget == int((16 - 4) * GIB * 0.9) and "for the OS" in why
    assert Device("cpu", 4 * GIB).budget()[0] == int(2.5 * GIB * 0.9)
    assert Device("cpu", 16 * GIB, available_bytes=10 * GIB).budget()[0] == int(9 * GIB)
    assert Device("cuda", 24 * GIB).budget()[0] == int(24 * GIB * 0.9)


def test_gpu_formats(catalog) -> None:  # type: ignore[no-untyped-def]
    gpu = Device("cuda", 80 * GIB)
    shape = catalog.get("Qwen2.5-32B-Instruct").shape()
    sizes = {f: plan(_request(shape, f, device=gpu)).memory.weights for f in ("bf16", "fp8", "awq-int4")}
    assert sizes["awq-int4"] < sizes["fp8"] < sizes["bf16"]
    assert sizes["bf16"] == 2 * shape.params_total
    assert plan(_request(shape, "awq-int4", device=gpu)).engine is Engine.VLLM
    vl = catalog.get("Qwen2.5-VL-7B-Instruct").shape()
    assert vl.encoder_params > 0.5e9
    assert plan(_request(vl, "bf16", device=gpu)).memory.weights == 2 * vl.params_total
    with pytest.raises(PlanError, match="does not run awq-int4"):
        plan(_request(shape, "awq-int4", device=gpu, engine=Engine.LLAMACPP))
    with pytest.raises(PlanError, match="fp8 KV"):
        plan(_request(shape, "q8_0", kv_type="fp8"))


def test_parse_format() -> None:
    assert parse_format("Q4_K_M") is WeightFormat.Q4_K_M
    assert parse_format("f16") is WeightFormat.FP16
    assert parse_format("AWQ") is WeightFormat.AWQ_INT4
    with pytest.raises(ValueError, match="unknown weight format 'q3_k'"):
        parse_format("q3_k")


# ---- targets -----------------------------------------------------------------------------------------
def test_targets(catalog, demo_checkpoint, demo_gguf) -> None:  # type: ignore[no-untyped-def]
    assert resolve_target("Qwen/Qwen3-8B-AWQ", catalog).format_hint is WeightFormat.AWQ_INT4
    local = resolve_target(str(demo_checkpoint("qwen3", "tiny")), catalog)
    assert local.entry is None and local.shape.layers == 2
    gguf = resolve_target(str(demo_gguf("qwen2", "tiny", "q8_0")), catalog)
    assert gguf.format_hint is WeightFormat.Q8_0 and gguf.file_type == "Q8_0"
    assert sum(t.nbytes for t in gguf.layout) == sum(
        t.nbytes for t in weight_layout(gguf.shape, WeightFormat.Q8_0)
    )
    with pytest.raises(TargetError, match="not in the catalog"):
        resolve_target("someone/not-a-qwen-model", catalog)


# ---- the accuracy goal: predicted peak RSS within 10% of the measured peak -------------------------
@pytest.fixture(scope="module")
def baseline(demo_gguf):  # type: ignore[no-untyped-def]
    return measure_runtime_baseline(demo_gguf("qwen3", "tiny", "q8_0"))


@pytest.mark.parametrize(
    ("arch", "size", "fmt", "ctx", "seqs", "kv", "flash"),
    [
        ("qwen3", "small", "f16", 1024, 4, "f16", False),  # large embedding, four KV streams
        ("qwen2", "small", "q4_0", 2048, 1, "f16", False),  # repacked weights, attention scores dominate
        ("qwen3_moe", "small", "q4_k_m", 2048, 2, "f16", False),  # experts, k-quant repack
        ("qwen2", "small", "q8_0", 1024, 2, "q8_0", True),  # quantized KV with flash attention
    ],
)
def test_predicted_peak_rss_within_10_percent(
    demo_gguf, quantized, baseline, catalog, arch, size, fmt, ctx, seqs, kv, flash
) -> None:  # type: ignore[no-untyped-def]
    path = demo_gguf(arch, size, fmt) if fmt in ("f16", "q8_0") else quantized(arch, size, fmt)
    target = resolve_target(str(path), catalog)
    device = replace(BIG_CPU, cpu_flags=hardware.cpu_flags())
    predicted = plan(
        PlanRequest(
            target.shape,
            target.format_hint,
            ctx,
            seqs,
            device,
            kv_type=kv,
            flash_attn=flash,
            runtime=baseline,
            layout=target.layout,
        )
    )
    measured = measure_engine_run(
        path, n_ctx=ctx * seqs, max_seqs=seqs, kv_type=kv, flash_attn=flash, threads=1
    )
    assert measured.n_ctx_seq == predicted.n_ctx_seq
    # The check must not be carried by the measured baseline alone.
    assert predicted.memory.peak - baseline.steady_bytes > 0.2 * predicted.memory.peak
    assert predicted.memory.peak == pytest.approx(measured.peak_bytes, rel=0.10)


# ---- the command -----------------------------------------------------------------------------------
def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("plan")(plan_cli.plan_command)
    app.command("other")(lambda: None)
    return app


def test_cli_plan_described_device_json() -> None:
    args = ["plan", "Qwen/Qwen2.5-7B-Instruct", "--ctx", "8192", "--bandwidth", "50", "--json"]
    result = CliRunner().invoke(_app(), [*args, "--memory", "16GB"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["weight_format"] == "q4_k_m" and data["engine"] == "llamacpp"
    assert data["memory_bytes"]["kv_cache"] == 28 * 4 * 128 * 2 * 2 * 8192
    assert data["verdict"] == "fits"
    assert data["decode_estimate"]["single_tok_s"] == pytest.approx(
        50e9 / data["decode_estimate"]["bytes_per_token"]
    )
    assert data["command"].startswith("qwenkit quantize Qwen/Qwen2.5-7B-Instruct --qtype q4_k_m")
    # 8 GB keeps 2 GiB for the OS: the attention scores no longer fit, flash attention fixes it.
    tight = json.loads(CliRunner().invoke(_app(), [*args, "--memory", "8GB"]).output)
    assert tight["verdict"] == "fits with changes"
    assert tight["changes"][0]["change"].startswith("turn on flash attention")


def test_cli_plan_local_gguf_table(demo_gguf) -> None:  # type: ignore[no-untyped-def]
    path = demo_gguf("qwen3", "tiny", "q8_0")
    result = CliRunner().invoke(_app(), ["plan", str(path), "--memory", "1GB", "--ctx", "1024"])
    assert result.exit_code == 0, result.output
    assert "KV cache" in result.output and "verdict:" in result.output
    assert f"qwenkit serve --model {path}" in result.output.replace("\n", "")


def test_cli_plan_errors_are_one_line() -> None:
    runner = CliRunner()
    bad = runner.invoke(_app(), ["plan", "Qwen3-8B", "--memory", "lots"])
    assert (
        bad.exit_code == 2
        and "cannot read memory size 'lots'" in bad.output
        and "Traceback" not in bad.output
    )
    unknown = runner.invoke(_app(), ["plan", "nobody/nothing", "--memory", "8GB"])
    assert unknown.exit_code == 2 and "qwenkit models catalog" in unknown.output
    gpu = runner.invoke(
        _app(), ["plan", "Qwen3-8B", "--memory", "8GB", "--format", "q4_k_m", "--device", "tpu"]
    )
    assert gpu.exit_code == 2 and "unknown device 'tpu'" in gpu.output


def test_size_units() -> None:
    assert plan_cli.parse_memory("8GB") == 8 * GIB == plan_cli.parse_memory("8 GiB")
    assert plan_cli.parse_memory("512MB") == 512 * MIB
    assert plan_cli.parse_memory("1.5t") == int(1.5 * 1024 * GIB)
    with pytest.raises(ValueError, match="too small"):
        plan_cli.parse_memory("1MB")
