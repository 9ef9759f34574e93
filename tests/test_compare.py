"""`qwenkit compare`: the report and select's checked pick on hand-made measurements, variants prepared from
the tiny demo, bad input, and (slow) a whole compare of the tiny demo in two formats."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenkit.catalog.planner import Device
from qwenkit.cli.app import app
from qwenkit.evals.compare import CompareConfig, CompareError, prepare_variants
from qwenkit.evals.compare_report import (
    PLOTS_HINT,
    CompareReport,
    VariantResult,
    check_recommendation,
    plots_task_scores,
    select_format,
    write_report,
)

runner = CliRunner()
MIB = 1024**2
BIG = Device("cpu", 64 * 1024**3, None, 20.0, None, "test machine")


def _variant(fmt: str, tok_s: float, agreement: float, peak_mib: int, model: str = "demo") -> VariantResult:
    return VariantResult(
        model=model,
        format=fmt,
        path=f"/models/{fmt}.gguf",
        file_type=fmt.upper(),
        size_bytes=peak_mib * MIB // 2,
        planned_peak_bytes=(peak_mib - 10) * MIB,
        planned_fits=True,
        measured_peak_bytes=peak_mib * MIB,
        tok_s_single=tok_s,
        tok_s_multi=4 * tok_s,
        reference_format="f16",
        kl_mean=0.0 if fmt == "f16" else 1 - agreement + 0.001,
        kl_p99=0.0 if fmt == "f16" else 2 * (1 - agreement + 0.001),
        kl_max=0.0 if fmt == "f16" else 3 * (1 - agreement + 0.001),
        top1_agreement=agreement,
        perplexity=10.0,
        ppl_ratio=1.0,
    )


def _report(*variants: VariantResult, min_agreement: float = 0.9) -> CompareReport:
    return CompareReport(
        variants=variants,
        streams=16,
        threads=2,
        context_per_seq=512,
        input_len=128,
        output_len=128,
        quick=False,
        tasks=(),
        min_agreement=min_agreement,
        device=None,
        recommendation=None,
    )


MEASURED = (
    _variant("f16", 10.0, 1.0, 1200),
    _variant("q8_0", 18.0, 0.98, 700),
    _variant("q4_k_m", 25.0, 0.93, 500),
    _variant("q4_0", 27.0, 0.85, 450),
)


def test_pick_confirmed_when_fastest_with_enough_agreement() -> None:
    rec = check_recommendation(_report(*MEASURED), "demo", "q4_k_m", "why", 2048 * MIB, "latency")
    assert rec.confirmed and rec.fits_measured and rec.fastest_ok == "q4_k_m"
    assert "it is the fastest (25.0 tok/s)" in rec.verdict
    # q4_0 is faster but below the threshold; lowering the threshold makes it the one to beat.
    rec = check_recommendation(
        _report(*MEASURED, min_agreement=0.8), "demo", "q4_k_m", "why", None, "latency"
    )
    assert not rec.confirmed and rec.fastest_ok == "q4_0" and rec.fits_measured is None
    assert "q4_0 is faster (27.0 vs 25.0 tok/s)" in rec.verdict
    # Within 5% of the fastest counts as a tie (run-to-run noise), still naming the faster one.
    close = dataclasses.replace(MEASURED[3], tok_s_single=26.0)
    rec = check_recommendation(
        _report(*MEASURED[:3], close, min_agreement=0.8), "demo", "q4_k_m", "why", None, "latency"
    )
    assert rec.confirmed and rec.fastest_ok == "q4_0" and "within 5% of the fastest" in rec.verdict


def test_pick_not_confirmed_when_slower_or_too_big() -> None:
    rec = check_recommendation(_report(*MEASURED), "demo", "q8_0", "why", 2048 * MIB, "quality")
    assert not rec.confirmed and rec.fits_measured and rec.fastest_ok == "q4_k_m"
    # A budget below q8_0's measured peak: it does not fit, and only smaller variants count as fastest.
    rec = check_recommendation(_report(*MEASURED), "demo", "q8_0", "why", 600 * MIB, "quality")
    assert rec.fits_measured is False and not rec.confirmed and "does NOT fit" in rec.verdict
    assert "the fastest that fits and keeps top-1 agreement ≥ 0.90: q4_k_m (25.0 tok/s)" in rec.verdict
    # A pick below the agreement threshold is never confirmed, however fast.
    rec = check_recommendation(_report(*MEASURED), "demo", "q4_0", "why", 2048 * MIB, "latency")
    assert not rec.confirmed and "agreement 0.850 is too low" in rec.verdict
    rec = check_recommendation(_report(*MEASURED), "demo", None, "nothing fits", 600 * MIB, "quality")
    assert rec.format is None and not rec.confirmed and rec.fastest_ok == "q4_k_m"
    assert rec.verdict.startswith("demo: nothing fits.")


def test_plots_show_task_scores_only_when_they_tell_the_variants_apart() -> None:
    with_tasks = dataclasses.replace(_report(*MEASURED), tasks=("arith",))

    def scored(*scores: float | None, kl: bool = True) -> CompareReport:
        variants = tuple(
            dataclasses.replace(v, task_score=s, kl_mean=v.kl_mean if kl else None)
            for v, s in zip(MEASURED, scores, strict=True)
        )
        return dataclasses.replace(with_tasks, variants=variants)

    assert not plots_task_scores(_report(*MEASURED))  # no tasks: fidelity
    assert plots_task_scores(scored(0.9, 0.8, 0.7, 0.5))
    # Random-weight demos score 0 everywhere: the KL divergence is the only signal left.
    assert not plots_task_scores(scored(0.0, 0.0, 0.0, 0.0))
    assert plots_task_scores(scored(0.0, 0.0, 0.0, 0.0, kl=False))
    assert not plots_task_scores(scored(0.9, None, 0.7, 0.5))


def test_select_format_follows_select_policy(
    demo_gguf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from qwenkit.gguf.quantize import quantize_gguf

    f16 = demo_gguf("qwen3", "tiny", "f16")
    q4 = quantize_gguf(f16, tmp_path_factory.mktemp("cmp") / "q4_0.gguf", "q4_0", threads=2)
    paths = {"f16": f16, "q8_0": demo_gguf("qwen3", "tiny", "q8_0"), "q4_0": q4}
    from qwenkit.catalog.planner import FALLBACK_BASELINE

    chosen, why = select_format(paths, BIG, FALLBACK_BASELINE, 512, "quality")
    assert chosen == "q8_0" and "most faithful" in why  # f16 never runs as a CPU GGUF in select
    assert select_format({"f16": f16}, BIG, FALLBACK_BASELINE, 512, "quality")[0] is None
    small = Device("cpu", 200 * MIB, None, 20.0, None, "too small")
    assert select_format(paths, small, FALLBACK_BASELINE, 512, "quality")[0] is None


def test_report_files_hold_the_numbers_escaped(tmp_path: Path) -> None:
    evil = _variant("q8_0", 18.0, 0.98, 700, model="<script>x</script>")
    report = dataclasses.replace(_report(*MEASURED, evil), recommendation=None)
    written = write_report(report, tmp_path)
    data = json.loads((tmp_path / "compare.json").read_text("utf-8"))
    assert [v["format"] for v in data["variants"]] == ["f16", "q8_0", "q4_k_m", "q4_0", "q8_0"]
    assert data["variants"][1]["measured_peak_bytes"] == 700 * MIB
    assert data["variants"][1]["plan_error"] == pytest.approx(690 / 700 - 1)
    page = (tmp_path / "compare.html").read_text("utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page and 'src="http' not in page
    assert "27.0" in page and "0.850" in page  # q4_0's speed and agreement
    if importlib.util.find_spec("matplotlib") is None:
        assert PLOTS_HINT in page and [p.name for p in written] == ["compare.json", "compare.html"]
    else:
        assert page.count("data:image/png;base64,") == 2
        assert {p.name for p in written} >= {"quality_vs_memory.png", "quality_vs_speed.png"}


def test_bad_input_is_one_line(demo_gguf: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(CompareError, match="unknown format 'q9'"):
        CompareConfig(models=("m",), formats=("f16", "q9"))
    with pytest.raises(CompareError, match="twice"):
        CompareConfig(models=("m",), formats=("f16", "f16"))
    q8 = demo_gguf("qwen3", "tiny", "q8_0")
    with pytest.raises(CompareError, match="cannot become f16"):
        prepare_variants(str(q8), ("f16", "q8_0"), threads=2)
    result = runner.invoke(app, ["compare", str(q8), "--formats", "f16,q9", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown format 'q9'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_prepare_variants_converts_once(demo_checkpoint: Callable[..., Path]) -> None:
    ckpt = demo_checkpoint("qwen3", "tiny")
    first = prepare_variants(str(ckpt), ("f16", "q4_0"), threads=2)
    assert [(v.format, v.path.name) for v in first] == [
        ("f16", "model-f16.gguf"),
        ("q4_0", "model-q4_0.gguf"),
    ]
    assert first[1].path.parent == first[0].path.parent  # quantized beside its f16 source, in the cache
    stamp = first[1].path.stat().st_mtime_ns
    again = prepare_variants(str(ckpt), ("f16", "q4_0"), threads=2)
    assert again == first and again[1].path.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_compare_of_the_tiny_demo_in_two_formats_with_a_task(
    demo_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    ckpt = demo_checkpoint("qwen3", "tiny")
    out = tmp_path / "report"
    args = ["compare", str(ckpt), "--formats", "q8_0,f16", "--quick", "--threads", "2", "--streams", "4"]
    args += ["--tasks", "arith"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    data = json.loads((out / "compare.json").read_text("utf-8"))
    ref, q8 = data["variants"]
    assert (ref["format"], q8["format"]) == ("f16", "q8_0")  # precision order, whatever the order given
    for v in (ref, q8):
        assert v["measured_peak_bytes"] > v["size_bytes"] > 0 and v["planned_peak_bytes"] > 0
        assert v["tok_s_single"] > 0 and v["tok_s_multi"] > 0 and v["reference_format"] == "f16"
        assert 0 <= v["task_score"] <= 1 and list(v["task_scores"]) == ["arith"] and v["task_errors"] == 0
    assert ref["kl_mean"] == 0.0 and ref["top1_agreement"] == 1.0 and ref["ppl_ratio"] == 1.0
    assert 0 < q8["kl_mean"] < 1e-3 and q8["top1_agreement"] > 0.9
    assert ref["size_bytes"] > q8["size_bytes"]
    (rec,) = data["recommendation"]
    assert rec["format"] == "q8_0" and rec["fits_measured"] is True  # the only format select runs on a CPU
    assert rec["fastest_ok"] in ("f16", "q8_0") and rec["verdict"] in result.stdout.replace("\n", " ")
    assert (out / "compare.html").is_file()
