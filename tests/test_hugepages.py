"""Huge pages under llama.cpp's memory (issue 12): /proc parsing on fixed text, then a real private mapping
advised and collapsed by the kernel, then a real LlamaModel with huge_pages on and off, and the CLI switch."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenkit.cli.app import app
from qwenkit.engines.llamacpp import hugepages
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.model import LlamaModel

MAPS = """\
55d0a0000000-55d0a3000000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0014000000 rw-p 00000000 00:00 0
7f0014000000-7f0015000000 r--s 005ac000 fe:00 16042235                   /models/q4_0.gguf
7f0016000000-7f0017000000 rw-p 00000000 00:00 0
7f0018000000-7f0018200000 rw-p 00000000 fe:00 99                         /usr/lib/libfoo.so
7f0019000000-7f0019400000 r--p 00000000 00:00 0
"""

SMAPS = """\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Rss:                2048 kB
AnonHugePages:         0 kB
7f0000200000-7f0014000000 rw-p 00000000 00:00 0
Rss:              325632 kB
AnonHugePages:    323584 kB
VmFlags: rd wr mr mw me ac hg
7f0016000000-7f0017000000 rw-p 00000000 00:00 0
AnonHugePages:      4096 kB
"""


def test_anonymous_regions_are_private_writable_and_unnamed(tmp_path: Path) -> None:
    (tmp_path / "maps").write_text(MAPS)
    assert hugepages.anonymous_regions(tmp_path) == {
        (0x7F0000000000, 0x7F0014000000),
        (0x7F0016000000, 0x7F0017000000),
    }
    assert hugepages.anonymous_regions(tmp_path / "missing") == set()


def test_huge_bytes_count_every_mapping_a_range_was_split_into(tmp_path: Path) -> None:
    (tmp_path / "smaps").write_text(SMAPS)
    whole = {(0x7F0000000000, 0x7F0014000000)}  # advising its aligned interior split it in two
    assert hugepages.huge_bytes_in(whole, tmp_path) == 323584 * 1024
    both = whole | {(0x7F0016000000, 0x7F0017000000)}
    assert hugepages.huge_bytes_in(both, tmp_path) == (323584 + 4096) * 1024
    assert hugepages.huge_bytes_in(whole, tmp_path / "missing") == 0


def _kernel_collapses() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 1)  # MADV_COLLAPSE


def _vm_flags(start: int) -> list[str]:
    blocks = Path("/proc/self/smaps").read_text().split("\n")
    inside = False
    for line in blocks:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            inside = int(lo, 16) <= start < int(hi, 16)
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return []


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc only")
def test_a_new_private_mapping_is_advised_and_collapsed_with_its_content_kept() -> None:
    before = hugepages.anonymous_regions()
    size = 24 << 20
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        pattern = bytes(range(256)) * 16
        for at in range(0, size, len(pattern)):
            area[at : at + len(pattern)] = pattern  # every page written: there is something to collapse
        ranges = hugepages.advise_new_regions(before)
        mine = [r for r in ranges if r[1] - r[0] >= 20 << 20]
        assert len(mine) == 1
        lo, hi = mine[0]
        assert lo % hugepages.HUGE_PAGE == 0 and hi % hugepages.HUGE_PAGE == 0
        assert "hg" in _vm_flags(lo)
        collapser = hugepages.Collapser(mine).start()
        assert collapser.wait(60)
        if _kernel_collapses():
            assert collapser.huge_bytes() >= 8 << 20
        assert all(area[at : at + len(pattern)] == pattern for at in range(0, size, len(pattern)))
        tiny = hugepages.advise_new_regions(before, min_bytes=size * 2)
        assert not [r for r in tiny if r[1] - r[0] >= 20 << 20]  # below the size floor: left alone
    finally:
        area.close()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc only")
def test_llama_model_puts_its_buffers_on_huge_pages_unless_told_not_to(
    demo_gguf: Callable[..., Path],
) -> None:
    # The tiny demo's weights are below MIN_REGION: what gets advised here is its KV cache and compute
    # buffer (the collapse itself is the test above; the 0.5B-shape q4_0 collapses ~300 MiB of weights).
    gguf_path = demo_gguf("qwen3", "tiny", "f32")
    model = LlamaModel(gguf_path, EngineConfig(n_ctx=1024, max_seqs=2, threads=2))
    try:
        ranges = model.huge_pages.ranges
        assert ranges and all("hg" in _vm_flags(lo) for lo, _ in ranges)
        assert model.huge_pages.wait(60)
        assert model.decode(list(range(100, 164)), list(range(64)), [0] * 64, [False] * 63 + [True]) == 0
    finally:
        model.close()
    plain = LlamaModel(gguf_path, EngineConfig(n_ctx=1024, max_seqs=2, threads=2, huge_pages=False))
    try:
        assert plain.huge_pages.ranges == () and plain.huge_pages.huge_bytes() == 0
        assert plain.huge_pages.wait(0)  # nothing started
    finally:
        plain.close()


def test_no_huge_pages_is_a_llamacpp_option(demo_checkpoint: Callable[..., Path]) -> None:
    result = CliRunner().invoke(
        app,
        ["serve", "--model", str(demo_checkpoint("qwen3", "tiny")), "--engine", "vllm", "--no-huge-pages"],
    )
    assert result.exit_code == 2 and "--no-huge-pages is a llama.cpp option" in result.output, result.output
