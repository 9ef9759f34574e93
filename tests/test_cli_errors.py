"""The CLI's one-line error: printed as given, brackets included (not read as rich markup)."""

from __future__ import annotations

import pytest
import typer

from qwenkit.cli import errors


def test_fail_prints_brackets_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    exit_ = errors.fail("install qwenkit[vllm], or pass [red]--engine llamacpp", code=3)
    assert isinstance(exit_, typer.Exit) and exit_.exit_code == 3
    err = capsys.readouterr().err
    assert "qwenkit[vllm]" in err and "[red]--engine llamacpp" in err
    assert len(err.strip().splitlines()) == 1
