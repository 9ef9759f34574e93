"""Quantization fidelity (qwenkit.evals.fidelity, `qwenkit fidelity`) on the real tiny demo model."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from qwenkit.cli.app import app
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.model import LlamaModel
from qwenkit.evals.fidelity import (
    FidelityConfig,
    FidelityError,
    FidelityReport,
    builtin_text,
    run_fidelity,
    score_rows,
)
from qwenkit.gguf.quantize import quantize_gguf

runner = CliRunner()
CTX = 64


@pytest.fixture(scope="module")
def variants(demo_gguf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny qwen3 demo as f16 (reference), q8_0, q4_0, and an f16 copy with one tensor broken."""
    ref = demo_gguf("qwen3", "tiny", "f16")
    root = tmp_path_factory.mktemp("fidelity")
    q4 = quantize_gguf(ref, root / "tiny-q4_0.gguf", "q4_0", threads=2)
    broken = root / "tiny-broken.gguf"
    shutil.copyfile(ref, broken)
    reader = gguf.GGUFReader(broken, "r+")
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    # Noise instead of the final norm's scales: the logits keep their size but point elsewhere.
    norm.data[:] = np.random.default_rng(0).normal(0.0, 20.0, norm.data.shape)
    del reader
    return {"f16": ref, "q8_0": demo_gguf("qwen3", "tiny", "q8_0"), "q4_0": q4, "broken": broken}


@pytest.fixture(scope="module")
def report(variants: dict[str, Path]) -> FidelityReport:
    candidates = (variants["f16"], variants["q8_0"], variants["q4_0"], variants["broken"])
    return run_fidelity(FidelityConfig(variants["f16"], candidates, ctx=CTX, chunks=2, threads=2))


def test_reference_against_itself_is_identical(report: FidelityReport) -> None:
    same = report.candidates[0]
    assert same.kl_mean == 0.0 and same.kl_max == 0.0 and same.kl_p99 == 0.0
    assert same.top1_agreement == 1.0
    assert same.perplexity == report.reference.perplexity and same.ppl_ratio == 1.0
    # The scored tokens: 2 windows, positions ctx/2 .. ctx-2 of each.
    assert report.windows == 2 and same.tokens == report.scored_tokens == 2 * (CTX - 1 - CTX // 2)


def test_q8_0_is_close_and_q4_0_further(report: FidelityReport) -> None:
    q8, q4 = report.candidates[1], report.candidates[2]
    assert q8.file_type == "Q8_0" and q4.file_type == "Q4_0"
    assert 0.0 < q8.kl_mean < 1e-3 and q8.top1_agreement >= 0.95
    assert q8.kl_mean <= q8.kl_p99 <= q8.kl_max
    assert q4.kl_mean > q8.kl_mean and q4.kl_p99 > q8.kl_p99
    assert math.isfinite(q4.perplexity) and abs(q4.ppl_ratio - 1) < 0.05


def test_a_broken_tensor_shows_large_kl_and_disagreement(report: FidelityReport) -> None:
    q4, broken = report.candidates[2], report.candidates[3]
    assert broken.kl_mean > 1000 * q4.kl_mean and broken.kl_mean > 0.1
    assert broken.top1_agreement < 0.5
    assert broken.ppl_ratio > 1.5


def test_perplexity_matches_a_hand_computation(variants: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(builtin_text(seed=7, words=400), "utf-8")
    got = run_fidelity(FidelityConfig(variants["q8_0"], (), text=text, ctx=CTX, chunks=1, threads=2))
    model = LlamaModel(
        variants["q8_0"], EngineConfig(n_ctx=CTX, max_seqs=1, n_batch=CTX, n_ubatch=CTX, threads=2)
    )
    try:
        window = model.tokenize(text.read_text("utf-8"), parse_special=False)[:CTX]
        assert model.decode(window, list(range(CTX)), [0] * CTX, [True] * CTX) == 0
        nll = []
        for i in range(CTX // 2, CTX - 1):
            row = model.logits(i).astype(np.float64)
            top = row.max()
            nll.append(-(row[window[i + 1]] - top - math.log(np.exp(row - top).sum())))
    finally:
        model.close()
    assert got.reference.tokens == len(nll)
    assert got.reference.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-9)


def test_score_rows_matches_the_kl_formula() -> None:
    ref = np.log(np.array([[0.5, 0.5, 1e-30], [0.7, 0.2, 0.1]], dtype=np.float32))
    cand = np.log(np.array([[0.9, 0.1, 1e-30], [0.1, 0.2, 0.7]], dtype=np.float32))
    rows = score_rows(ref, cand, np.array([1, 0]))
    want = [0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), sum(p * math.log(p / q) for p, q in
            [(0.7, 0.1), (0.2, 0.2), (0.1, 0.7)])]  # fmt: skip
    assert rows["kl"] == pytest.approx(want, rel=1e-6)
    assert rows["same"].tolist() == [True, False]
    assert rows["nll"] == pytest.approx([-math.log(0.1), -math.log(0.1)], rel=1e-6)
    assert rows["delta_p"] == pytest.approx([0.1 - 0.5, 0.1 - 0.7], rel=1e-6)


def test_builtin_text_is_deterministic_plain_english() -> None:
    text = builtin_text(seed=3, words=300)
    assert text == builtin_text(seed=3, words=300) != builtin_text(seed=4, words=300)
    assert text.isascii() and len(text.split()) >= 300 and text.count(".") > 10


def test_a_different_vocabulary_is_refused(demo_gguf: Callable[..., Path], variants: dict[str, Path]) -> None:
    other = demo_gguf("qwen3_5", "tiny", "q8_0")
    with pytest.raises(FidelityError, match="vocabulary"):
        run_fidelity(FidelityConfig(variants["f16"], (other,), ctx=CTX, chunks=1, threads=2))
    result = runner.invoke(app, ["fidelity", "-r", str(variants["f16"]), str(other), "--threads", "2"])
    assert result.exit_code == 2
    assert "vocabulary" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_cli_writes_json_and_a_short_text_is_one_line(variants: dict[str, Path], tmp_path: Path) -> None:
    args = ["fidelity", "-r", str(variants["f16"]), str(variants["q8_0"]), "--threads", "2", "--ctx", "64"]
    result = runner.invoke(app, [*args, "--chunks", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    saved = json.loads((tmp_path / "out" / "fidelity.json").read_text("utf-8"))
    assert saved["reference"]["kl_mean"] == 0.0 and saved["candidates"][0]["file_type"] == "Q8_0"
    assert saved["candidates"][0]["kl_mean"] > 0 and "Q8_0" in result.stdout
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", "utf-8")
    result = runner.invoke(app, [*args, "--text", str(short)])
    assert result.exit_code == 2
    assert "fewer than one window of 64" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_run_too_big_for_the_scratch_disk_names_a_chunks_that_fits(
    variants: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenkit.gguf.reader import read_gguf_info

    window = (CTX - 1 - CTX // 2) * read_gguf_info(variants["f16"]).vocab_size * 4
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=3 * window))
    config = FidelityConfig(variants["f16"], (variants["q8_0"],), ctx=CTX, chunks=4, threads=2)
    with pytest.raises(FidelityError, match=r"pass --chunks 2 or less"):
        run_fidelity(config)
    # What the message proposes runs.
    assert run_fidelity(dataclasses.replace(config, chunks=2)).windows == 2
