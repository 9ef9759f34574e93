"""The memory planner: exact GGUF layouts, the KV formula, verdicts and changes, and predicted peak RSS
within 10% of what the engine really uses (measured in fresh processes on the demo checkpoints)."""

from __future__ import annotations

import inspect
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
from qwenkit.catalog.planner import (
    GIB,
    MIB,
    SERVE_STATE_CACHE_MB,
    Device,
    Engine,
    PlanError,
    PlanRequest,
    Verdict,
    plan,
)
from qwenkit.catalog.select import run_command
from qwenkit.catalog.shape import ModelShape
from qwenkit.catalog.target import TargetError, resolve_target
from qwenkit.cli import plan as plan_cli
from qwenkit.cli import serve as serve_cli
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
        ("qwen3_5", "small", "f16"),  # Gated DeltaNet layers: ssm_* tensors, gated q, f32 conv
        ("qwen3_5_moe", "small", "q4_k_m"),  # hybrid + experts + shared expert, k-quant recipe
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
    slow = plan(_request(shape, "q4_k_m", context=32768, flash_attn=False))
    fast = plan(_request(shape, "q4_k_m", context=32768, flash_attn=True))
    scores = 4 * shape.heads * 32768 * 512  # f32 heads × n_kv × n_batch
    assert slow.memory.compute - fast.memory.compute > scores
    assert any("flash attention would save" in n for n in slow.notes)
    # The engine's default (llama.cpp's auto) has it on, so a plan that does not say has it too.
    default = plan(_request(shape, "q4_k_m", context=32768))
    assert default.flash_attn and default.memory == fast.memory and not default.notes


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


# ---- hybrid (Gated DeltaNet) memory ------------------------------------------------------------------
# Qwen3.5-0.8B's config.json (text_config), as published on the hub.
QWEN3_5_0_8B = {
    "model_type": "qwen3_5",
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 1024, "intermediate_size": 3584,
        "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
        "max_position_embeddings": 262144, "tie_word_embeddings": True,
        "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6,
    },
}  # fmt: skip


def _moe_35b_config() -> dict:
    # transformers documents Qwen3_5MoeTextConfig's defaults as the Qwen3.5-35B-A3B configuration.
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig().to_dict() | {"model_type": "qwen3_5_moe"}


def test_recurrent_state_from_the_real_configs(catalog) -> None:  # type: ignore[no-untyped-def]
    small = ModelShape.from_config(QWEN3_5_0_8B)
    # By hand from the config: 18 DeltaNet layers; conv state (4-1) x (2 x 16x128 + 16x128); delta state
    # 16 heads x 128 x 128; f32 as llama.cpp keeps them.
    assert (small.kv_layers, small.linear_layers) == (6, 18)
    assert small.recurrent_state_bytes_per_seq() == 18 * (3 * (2 * 2048 + 2048) + 16 * 128 * 128) * 4
    assert small.kv_bytes_per_token(2) == 6 * 2 * 256 * 2 * 2
    assert small.tensors() == catalog.get("Qwen3.5-0.8B").shape().tensors()
    moe = ModelShape.from_config(_moe_35b_config())
    assert (moe.layers, moe.kv_layers, moe.experts, moe.experts_used) == (40, 10, 256, 8)
    assert moe.recurrent_state_bytes_per_seq() == 30 * (3 * (2 * 2048 + 4096) + 32 * 128 * 128) * 4
    assert moe.tensors() == catalog.get("Qwen3.5-35B-A3B").shape().tensors()


def test_irregular_layer_types_are_refused() -> None:
    config = json.loads(json.dumps(QWEN3_5_0_8B))
    config["text_config"]["layer_types"][0] = "full_attention"
    with pytest.raises(ValueError, match="not a regular full-attention interval"):
        ModelShape.from_config(config)


def test_hybrid_plan_has_kv_on_full_attention_layers_and_a_state_per_sequence(catalog) -> None:  # type: ignore[no-untyped-def]
    shape = catalog.get("Qwen3.5-9B").shape()
    one = plan(_request(shape, "q4_k_m", context=32768, concurrency=1))
    assert one.memory.kv_cache == 8 * 4 * 256 * 2 * 2 * 32768  # 8 of 32 layers carry KV
    assert one.memory.recurrent == shape.recurrent_state_bytes_per_seq() == 24 * (3 * 8192 + 32 * 128**2) * 4
    longer = plan(_request(shape, "q4_k_m", context=65536, concurrency=1))
    assert longer.memory.recurrent == one.memory.recurrent  # the state does not grow with the context
    four = plan(_request(shape, "q4_k_m", context=32768, concurrency=4))
    assert four.memory.recurrent == 4 * one.memory.recurrent
    assert four.memory.peak - one.memory.peak >= 3 * (one.memory.recurrent + one.memory.kv_cache)
    assert any("KV cache on 8 of 32 layers" in n for n in one.notes)
    # A dense transformer of the same size keeps KV on every layer and no state.
    dense = plan(_request(catalog.get("Qwen3-8B").shape(), "q4_k_m", context=32768))
    assert dense.memory.recurrent == 0 and dense.memory.kv_cache > 2 * one.memory.kv_cache


def test_moe_expert_weights_are_shown(catalog) -> None:  # type: ignore[no-untyped-def]
    p = plan(_request(catalog.get("Qwen3.5-35B-A3B").shape(), "q4_k_m"))
    routed = [lay for lay in weight_layout(p.request.shape, WeightFormat.Q4_K_M) if lay.tensor.experts > 1]
    assert p.memory.experts == sum(lay.nbytes for lay in routed) > 0.8 * p.memory.weights


def test_recurrent_state_matches_what_llama_cpp_keeps(demo_gguf) -> None:  # type: ignore[no-untyped-def]
    import llama_cpp

    from qwenkit.gguf.reader import read_gguf_info

    path = demo_gguf("qwen3_5", "tiny", "f16")
    shape = ModelShape.from_gguf_info(read_gguf_info(path))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    sizes = {}
    for n in (8, 16, 32):
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        llm.eval(list(range(1000, 1000 + n)))
        sizes[n] = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    # A sequence's saved state: a small header, per token its K and V (+ cell metadata), and the
    # fixed recurrent state of every DeltaNet layer.
    per_token = (sizes[32] - sizes[16]) // 16
    assert per_token == (sizes[16] - sizes[8]) // 8
    assert 0 <= per_token - shape.kv_bytes_per_token(2) < 64
    fixed = sizes[8] - 8 * per_token
    assert 0 <= fixed - shape.recurrent_state_bytes_per_seq() < 1024


@pytest.mark.slow  # 11-15 s
def test_the_baseline_is_measured_with_the_models_own_vocabulary(tmp_path: Path) -> None:
    from qwenkit.catalog.measure import cached_runtime_baseline
    from qwenkit.paths import CACHE_ENV

    env = {CACHE_ENV: str(tmp_path)}
    qwen3 = cached_runtime_baseline(env, vocab=151936)
    qwen3_5 = cached_runtime_baseline(env, vocab=248320)
    # llama.cpp's vocabulary tables grow with the vocabulary: Qwen3.5's 96K more tokens hold more memory.
    assert qwen3_5.steady_bytes > qwen3.steady_bytes + 8 * MIB
    assert cached_runtime_baseline(env, vocab=248320) == qwen3_5  # measured once, then cached
    assert (tmp_path / "planner" / "runtime-baseline-qwen3_5.json").is_file()


# ---- the accuracy goal: predicted peak RSS within 10% of the measured peak -------------------------
@pytest.fixture(scope="module")
def baseline(demo_gguf):  # type: ignore[no-untyped-def]
    return measure_runtime_baseline(demo_gguf("qwen3", "tiny", "q8_0"))


@pytest.fixture(scope="module")
def hybrid_baseline(demo_gguf):  # type: ignore[no-untyped-def]
    return measure_runtime_baseline(demo_gguf("qwen3_5", "small", "f16"))


@pytest.mark.parametrize(
    ("arch", "size", "fmt", "ctx", "seqs", "kv", "flash"),
    [
        ("qwen3", "small", "f16", 1024, 4, "f16", False),  # large embedding, four KV streams
        ("qwen2", "small", "q4_0", 2048, 1, "f16", False),  # repacked weights, attention scores dominate
        ("qwen3_moe", "small", "q4_k_m", 2048, 2, "f16", False),  # experts, k-quant repack
        ("qwen2", "small", "q8_0", 1024, 2, "q8_0", True),  # quantized KV with flash attention
        ("qwen3_5", "small", "f16", 2048, 2, "f16", False),  # hybrid: KV on 1 layer in 4 + state
        ("qwen3_5_moe", "small", "q4_k_m", 1024, 4, "f16", False),  # hybrid MoE, four state slots
    ],
)
def test_predicted_peak_rss_within_10_percent(
    demo_gguf, quantized, baseline, hybrid_baseline, catalog, arch, size, fmt, ctx, seqs, kv, flash
) -> None:  # type: ignore[no-untyped-def]
    path = demo_gguf(arch, size, fmt) if fmt in ("f16", "q8_0") else quantized(arch, size, fmt)
    target = resolve_target(str(path), catalog)
    device = replace(BIG_CPU, cpu_flags=hardware.cpu_flags())
    if target.shape.is_hybrid:
        # The baseline holds the vocabulary: measure it with Qwen3.5's 248,320 tokens, not Qwen3's.
        baseline = hybrid_baseline
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
    # 8 GB keeps 2 GiB for the OS: without flash attention the attention scores no longer fit.
    tight = json.loads(CliRunner().invoke(_app(), [*args, "--memory", "8GB", "--flash-attn", "off"]).output)
    assert tight["verdict"] == "fits with changes"
    assert tight["changes"][0]["change"].startswith("turn on flash attention")


def test_cli_plan_shows_the_hybrid_parts(catalog) -> None:  # type: ignore[no-untyped-def]
    args = ["plan", "Qwen/Qwen3.5-35B-A3B", "--ctx", "32768", "-c", "2", "--device", "cpu"]
    args += ["--memory", "32GB"]
    data = json.loads(CliRunner().invoke(_app(), [*args, "--json"]).output)
    # A natively multimodal hybrid still plans its text tower on llama.cpp (the vision tower is skipped).
    assert data["engine"] == "llamacpp" and data["weight_format"] == "q4_k_m"
    shape = catalog.get("Qwen3.5-35B-A3B").shape()
    memory = data["memory_bytes"]
    assert memory["kv_cache"] == 10 * 2 * 256 * 2 * 2 * 32768 * 2
    assert memory["recurrent"] == 2 * shape.recurrent_state_bytes_per_seq()
    assert 0.8 * memory["weights"] < memory["experts"] < memory["weights"]
    table = CliRunner().invoke(_app(), args, terminal_width=200).output
    assert "recurrent state" in table and "10 of 40 layers (full attention only)" in table
    assert "of which MoE experts" in table and "+16-bit encoder" not in table


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


# ---- qwenkit serve's saved-state cache on hybrids ------------------------------------------------------
def test_a_served_hybrid_counts_the_state_cache(catalog) -> None:  # type: ignore[no-untyped-def]
    shape = catalog.get("Qwen3.5-9B").shape()
    alone = plan(_request(shape, "q4_k_m"))  # an engine without a server: no state cache
    served = plan(_request(shape, "q4_k_m", state_cache_mb=SERVE_STATE_CACHE_MB))
    assert alone.memory.state_cache == 0
    assert served.memory.state_cache == SERVE_STATE_CACHE_MB * MIB
    assert served.memory.peak - alone.memory.peak == served.memory.state_cache
    assert any("--state-cache-mb" in n for n in served.notes)
    assert not any("--state-cache-mb" in n for n in alone.notes)
    # A transformer without recurrent state is not counted; on a GPU the cache is host memory (noted only).
    dense = plan(_request(catalog.get("Qwen3-8B").shape(), "q4_k_m", state_cache_mb=SERVE_STATE_CACHE_MB))
    assert dense.memory.state_cache == 0 and not any("--state-cache-mb" in n for n in dense.notes)
    gpu = Device("cuda", 24 * GIB, name="test gpu")
    on_gpu = plan(_request(shape, "q4_k_m", device=gpu, state_cache_mb=SERVE_STATE_CACHE_MB))
    assert on_gpu.engine is Engine.LLAMACPP and on_gpu.memory.state_cache == 0
    assert any("outside the GPU budget" in n for n in on_gpu.notes)
    with pytest.raises(PlanError, match="--state-cache-mb 0"):
        plan(_request(shape, "q4_k_m", state_cache_mb=-1))


def test_a_smaller_state_cache_is_offered_when_it_is_what_does_not_fit(catalog) -> None:  # type: ignore[no-untyped-def]
    shape = catalog.get("Qwen3.5-0.8B").shape()
    alone = plan(_request(shape, "q8_0"))
    # Room for everything but 300 MiB of saved states: the server's 1 GiB cache must shrink.
    room = alone.memory.required + 300 * MIB
    device = Device("cpu", 64 * GIB, int(room / 0.9) + 1, 20.0, frozenset({"avx2"}), "tight box")
    served = plan(_request(shape, "q8_0", device=device, state_cache_mb=SERVE_STATE_CACHE_MB))
    assert served.verdict is Verdict.FITS_WITH_CHANGES
    capped = next(c for c in served.changes if c.summary.startswith("cap the state cache"))
    assert capped.plan.fits and capped.plan.request.state_cache_mb == 256
    assert capped.plan.memory.state_cache == 256 * MIB
    assert "--state-cache-mb 256" in run_command("Qwen/Qwen3.5-0.8B", capped.plan)
    default = plan(_request(shape, "q8_0", state_cache_mb=SERVE_STATE_CACHE_MB))
    assert "--state-cache-mb" not in run_command("Qwen/Qwen3.5-0.8B", default)


def test_cli_plan_counts_the_servers_state_cache() -> None:
    args = ["plan", "Qwen3.5-0.8B", "--ctx", "4096", "--device", "cpu", "--memory", "16GB", "--json"]
    default = json.loads(CliRunner().invoke(_app(), args).output)
    assert default["memory_bytes"]["state_cache"] == SERVE_STATE_CACHE_MB * MIB
    off = json.loads(CliRunner().invoke(_app(), [*args, "--state-cache-mb", "0"]).output)
    assert off["memory_bytes"]["state_cache"] == 0 and "--state-cache-mb 0" in off["command"]
    assert default["memory_bytes"]["peak"] - off["memory_bytes"]["peak"] == SERVE_STATE_CACHE_MB * MIB
    table = CliRunner().invoke(_app(), args[:-1], terminal_width=200).output
    assert "state cache" in table
    # The planner's default is the one `qwenkit serve` starts with.
    serve_default = inspect.signature(serve_cli.serve_command).parameters["state_cache_mb"].default
    assert serve_default == SERVE_STATE_CACHE_MB > 0
