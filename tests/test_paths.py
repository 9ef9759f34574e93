"""qwenkit.paths.atomic_write: the one way reports and caches are written."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from qwenkit.paths import atomic_write


def test_text_and_bytes_land_whole_with_ordinary_permissions(tmp_path: Path) -> None:
    text_file, bytes_file = tmp_path / "new" / "report.json", tmp_path / "plot.png"
    atomic_write(text_file, "héllo\n")
    atomic_write(bytes_file, b"\x89PNG")
    assert text_file.read_bytes() == "héllo\n".encode() and bytes_file.read_bytes() == b"\x89PNG"
    assert stat.S_IMODE(text_file.stat().st_mode) == 0o644 == stat.S_IMODE(bytes_file.stat().st_mode)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "plot.png", "report.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "eval.json"
    atomic_write(target, "old")
    with pytest.raises(TypeError):
        atomic_write(target, 42)  # type: ignore[arg-type]
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]
