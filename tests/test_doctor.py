"""The hardware probe and `qwenkit doctor`: OS facts parsed right, missing facts reported as missing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from qwenkit import hardware
from qwenkit.catalog.planner import GIB
from qwenkit.cli import plan as plan_cli

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni

processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimddp i8mm sve
CPU implementer\t: 0x41
"""
MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8192000 kB\n"


def test_cpu_model_and_flags_x86(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(X86)
    assert hardware.cpu_model(info) == "AMD EPYC 9654 96-Core Processor"
    flags = hardware.cpu_flags(info)
    assert flags is not None and "avx512_vnni" in flags
    assert hardware.simd_features(flags) == [
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
    ]


def test_cpu_flags_arm_and_missing(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(ARM)
    assert hardware.simd_features(hardware.cpu_flags(info)) == ["asimd", "asimddp", "asimdhp", "i8mm", "sve"]
    assert hardware.cpu_model(info)  # falls back to the platform's name, never empty
    assert hardware.cpu_flags(tmp_path / "absent") is None
    assert hardware.simd_features(None) == []


def test_memory_info_and_cgroup_limits(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    no_cgroup = hardware.memory_info(meminfo, tmp_path / "nocgroup")
    assert (no_cgroup.total, no_cgroup.available, no_cgroup.cgroup_limit) == (
        16384000 * 1024,
        8192000 * 1024,
        None,
    )
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{4 * GIB}\n")
    (v2 / "memory.current").write_text(f"{3 * GIB}\n")
    capped = hardware.memory_info(meminfo, v2)
    assert (capped.total, capped.available, capped.cgroup_limit) == (4 * GIB, GIB, 4 * GIB)
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("123\n")
    assert hardware.memory_info(meminfo, v1.parent).cgroup_limit is None
    (v2 / "memory.max").write_text("max\n")
    assert hardware.memory_info(meminfo, v2).total == 16384000 * 1024
    assert hardware.memory_info(tmp_path / "absent", tmp_path / "nocgroup") == hardware.MemoryInfo(None, None)


def test_bandwidth_is_measured() -> None:
    bw = hardware.memory_bandwidth(size_mib=16, repeats=2, threads=2)
    assert bw.read_gbs > 0 and bw.copy_gbs > 0 and bw.threads == 2


def test_disks_use_the_nearest_existing_parent(tmp_path: Path) -> None:
    (disk,) = hardware.disks({"cache": tmp_path / "not" / "made" / "yet"})
    assert (
        disk.free_bytes is not None and disk.free_bytes > 0 and disk.path == tmp_path / "not" / "made" / "yet"
    )


def _fake_nvidia_smi(directory: Path, output: str) -> None:
    exe = directory / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_gpus_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvidia_smi(tmp_path, "NVIDIA H100 80GB HBM3, 81559, 80000, 9.0\nNVIDIA L4, 23034, [N/A], [N/A]\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    h100, l4 = hardware.gpus(use_torch=False)
    assert (h100.name, h100.total_bytes, h100.free_bytes, h100.compute_capability) == (
        "NVIDIA H100 80GB HBM3",
        81559 * 1024**2,
        80000 * 1024**2,
        "9.0",
    )
    assert l4.free_bytes is None and l4.compute_capability is None and l4.source == "nvidia-smi"


def test_no_gpu_is_an_empty_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert hardware.gpus(use_torch=False) == []


def test_engines_report_llama_cpp() -> None:
    llama = next(e for e in hardware.engines() if e.name == "llama.cpp")
    assert llama.installed and llama.version and ("CPU" in llama.detail or "GPU" in llama.detail)


def test_described_device_and_missing_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    described = plan_cli.resolve_device("cuda", "24GB", 900.0)
    assert (described.kind, described.total_bytes, described.available_bytes, described.bandwidth_gbs) == (
        "cuda",
        24 * GIB,
        None,
        900.0,
    )
    monkeypatch.setattr(hardware, "gpus", lambda use_torch=True: [])
    with pytest.raises(ValueError, match="no CUDA GPU found"):
        plan_cli.resolve_device("cuda", None, None)
    here = plan_cli.resolve_device(None, None, 10.0)
    assert here.kind == "cpu" and here.available_bytes and here.cpu_flags is not None


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("doctor")(plan_cli.doctor_command)
    app.command("other")(lambda: None)
    return app


def test_doctor_json_and_table() -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["doctor", "--json", "--no-bandwidth"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["cpu_model"] and data["physical_cores"] >= 1 and data["memory"]["total"] > 0
    assert {d["what"] for d in data["disks"]} == {"qwenkit cache", "Hugging Face cache", "ModelScope cache"}
    assert data["llama_cpp_check"].startswith("working")
    baseline = data["runtime_baseline"]
    assert 0 < baseline["steady_bytes"] <= baseline["peak_bytes"]
    table = runner.invoke(_app(), ["doctor"], terminal_width=200)
    assert table.exit_code == 0
    for label in ("CPU", "SIMD", "RAM", "bandwidth", "GPU", "disk", "engine", "planner"):
        assert label in table.output
