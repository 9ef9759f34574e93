"""Facts about this machine that engines, the planner and `qwenkit doctor` size themselves by.

Contract: pure reads of the OS (no side effects) except memory_bandwidth(), which times a short array
copy and sum in this process. Each function falls back to a safe answer where the information is missing
(containers, non-Linux, no GPU): None or an empty list, never a guess. probe() gathers everything for
the doctor; engines() reports which inference engines are installed (importable) and their versions.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = [
    "GPU",
    "Bandwidth",
    "Disk",
    "EngineStatus",
    "HardwareReport",
    "MemoryInfo",
    "cpu_flags",
    "cpu_model",
    "disks",
    "engines",
    "gpus",
    "memory_bandwidth",
    "memory_info",
    "physical_cores",
    "probe",
    "simd_features",
    "usable_cpus",
]

# The SIMD extensions inference kernels use, in the spelling of /proc/cpuinfo (x86 flags, ARM Features).
_SIMD = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "asimdhp", "i8mm",
    "bf16", "sve", "sve2",
)  # fmt: skip
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def usable_cpus() -> list[int]:
    """CPU ids this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the usable CPUs (hyper-threads of one core count once)."""
    cores: set[tuple[str, str]] = set()
    for cpu in usable_cpus():
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(usable_cpus())
        cores.add((package, core))
    return max(1, len(cores))


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    # The first processor's block: every core of a machine reports the same model and flags.
    fields: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name, or the platform's processor string when /proc/cpuinfo has none."""
    info = _cpuinfo(cpuinfo)
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if info.get(key):
            return info[key]
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """All CPU feature flags (x86 `flags`, ARM `Features`), or None where the OS does not say."""
    info = _cpuinfo(cpuinfo)
    raw = info.get("flags") or info.get("Features")
    return frozenset(raw.lower().split()) if raw else None


def simd_features(flags: Iterable[str] | None) -> list[str]:
    """The SIMD extensions among `flags` that matter to inference kernels, in a fixed order."""
    have = set(flags or ())
    return [f for f in _SIMD if f in have]


@dataclass(frozen=True)
class MemoryInfo:
    """RAM in bytes; `available` is what can be allocated without swapping (cgroup limit included)."""

    total: int | None
    available: int | None
    cgroup_limit: int | None = None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def memory_info(
    meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> MemoryInfo:
    """MemTotal/MemAvailable from /proc/meminfo, capped by the cgroup's memory limit when there is one."""
    values: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * 1024
    except OSError:
        pass
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    limit = used = None
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # cgroup v1
    ):
        limit = _read_int(cgroup_root / limit_file)
        if limit is not None:
            used = _read_int(cgroup_root / usage_file)
            break
    if limit is not None and limit < _NO_LIMIT:
        total = min(total, limit) if total else limit
        if used is not None:
            room = max(0, limit - used)
            available = min(available, room) if available is not None else room
    else:
        limit = None
    return MemoryInfo(total=total, available=available, cgroup_limit=limit)


@dataclass(frozen=True)
class Bandwidth:
    """Best-of-n memory bandwidth in GB/s (1e9 bytes) over arrays larger than the caches."""

    read_gbs: float
    copy_gbs: float
    threads: int
    array_mib: int


def memory_bandwidth(size_mib: int = 128, repeats: int = 5, threads: int | None = None) -> Bandwidth:
    """Time summing (read) and copying an array, split across threads (numpy releases the GIL)."""
    import numpy as np

    threads = threads or physical_cores()
    src = np.ones(size_mib * 1024 * 1024 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    src_parts, dst_parts = np.array_split(src, threads), np.array_split(dst, threads)

    def best(fn: object) -> float:
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            fastest = min(fastest, time.perf_counter() - start)
        return fastest

    with ThreadPoolExecutor(threads) as pool:
        read = best(lambda: list(pool.map(np.sum, src_parts)))
        copy = best(lambda: list(pool.map(np.copyto, dst_parts, src_parts)))
    # A copy reads and writes every byte once.
    return Bandwidth(src.nbytes / read / 1e9, 2 * src.nbytes / copy / 1e9, threads, size_mib)


@dataclass(frozen=True)
class GPU:
    name: str
    total_bytes: int
    free_bytes: int | None
    source: str  # "torch" or "nvidia-smi"
    compute_capability: str | None = None


def _torch_gpus() -> list[GPU]:
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        out.append(GPU(props.name, int(total), int(free), "torch", f"{props.major}.{props.minor}"))
    return out


def _nvidia_smi_gpus() -> list[GPU]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "--query-gpu=name,memory.total,memory.free,compute_cap"
    try:
        done = subprocess.run(
            [exe, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    out = []
    for line in done.stdout.strip().splitlines() if done.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[1].isdigit():
            free = int(parts[2]) * 1024 * 1024 if parts[2].isdigit() else None
            cap = parts[3] if len(parts) > 3 and parts[3] not in ("", "[N/A]") else None
            out.append(GPU(parts[0], int(parts[1]) * 1024 * 1024, free, "nvidia-smi", cap))
    return out


def gpus(use_torch: bool = True) -> list[GPU]:
    """CUDA GPUs via torch when it is installed with CUDA, else via nvidia-smi; [] when there are none."""
    found = _torch_gpus() if use_torch else []
    return found or _nvidia_smi_gpus()


@dataclass(frozen=True)
class Disk:
    what: str
    path: Path
    free_bytes: int | None
    total_bytes: int | None


def disks(paths: Mapping[str, Path]) -> list[Disk]:
    """Free space where each named path lives (its nearest existing parent, since caches start empty)."""
    out = []
    for what, path in paths.items():
        probe_at = path
        while not probe_at.exists() and probe_at != probe_at.parent:
            probe_at = probe_at.parent
        try:
            usage = shutil.disk_usage(probe_at)
            out.append(Disk(what, path, usage.free, usage.total))
        except OSError:
            out.append(Disk(what, path, None, None))
    return out


@dataclass(frozen=True)
class EngineStatus:
    name: str
    package: str
    installed: bool
    version: str | None
    detail: str = ""


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def engines() -> list[EngineStatus]:
    """Which engines are importable, and what their builds say (llama.cpp's CPU features, CUDA)."""
    out = []
    if importlib.util.find_spec("llama_cpp") is not None:
        try:
            import llama_cpp

            info = llama_cpp.llama_print_system_info().decode(errors="replace").strip(" |")
            gpu = "GPU offload" if llama_cpp.llama_supports_gpu_offload() else "CPU only"
            out.append(
                EngineStatus(
                    "llama.cpp", "llama-cpp-python", True, _version("llama-cpp-python"), f"{gpu}; {info}"
                )
            )
        except Exception as error:  # a broken native build raises anything from OSError to AttributeError
            out.append(
                EngineStatus(
                    "llama.cpp",
                    "llama-cpp-python",
                    False,
                    _version("llama-cpp-python"),
                    f"import fails: {error}",
                )
            )
    else:
        out.append(EngineStatus("llama.cpp", "llama-cpp-python", False, None, "pip install 'qwenkit[cpu]'"))
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            cuda = torch.cuda.is_available()
            detail = (
                f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
                if cuda
                else "CPU build or no GPU"
            )
            out.append(EngineStatus("torch", "torch", True, _version("torch"), detail))
        except Exception as error:  # a broken install raises anything from OSError to RuntimeError
            out.append(EngineStatus("torch", "torch", False, _version("torch"), f"import fails: {error}"))
    else:
        out.append(EngineStatus("torch", "torch", False, None, "pip install 'qwenkit[torch]'"))
    for name, package, hint in (
        ("transformers", "transformers", "pip install 'qwenkit[torch]'"),
        ("vLLM", "vllm", "pip install vllm (CUDA GPUs)"),
    ):
        present = importlib.util.find_spec(package) is not None
        out.append(
            EngineStatus(
                name, package, present, _version(package) if present else None, "" if present else hint
            )
        )
    return out


@dataclass(frozen=True)
class HardwareReport:
    cpu_model: str
    physical_cores: int
    logical_cpus: int
    cpu_flags: frozenset[str] | None
    simd: list[str]
    memory: MemoryInfo
    bandwidth: Bandwidth | None
    gpus: list[GPU]
    disks: list[Disk]
    engines: list[EngineStatus] = field(default_factory=list)


def probe(
    cache_paths: Mapping[str, Path] | None = None, bandwidth: bool = True, check_engines: bool = True
) -> HardwareReport:
    """Everything the doctor shows (the bandwidth test takes about a second)."""
    flags = cpu_flags()
    return HardwareReport(
        cpu_model=cpu_model(),
        physical_cores=physical_cores(),
        logical_cpus=len(usable_cpus()),
        cpu_flags=flags,
        simd=simd_features(flags),
        memory=memory_info(),
        bandwidth=memory_bandwidth() if bandwidth else None,
        gpus=gpus(use_torch=check_engines),
        disks=disks(cache_paths or {}),
        engines=engines() if check_engines else [],
    )
