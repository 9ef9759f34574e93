"""vLLM behind qwenkit's Engine protocol: the GPU and multi-node engine (extra `qwenkit[vllm]`).

Contract: unavailable_reason() says in one line why vLLM cannot run on this machine (not installed, no
NVIDIA GPU, fewer GPUs than asked for), naming the llama.cpp engine, or None when it can; it imports
neither vLLM nor torch when the answer is already known. VllmEngine (engine.py) and the pure translations
(translate.py) import vLLM only when a real engine is built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from qwenkit import hardware

FALLBACK = "serve on the CPU with the llama.cpp engine (--engine llamacpp, the default)"


def count_nvidia_gpus() -> int:
    """NVIDIA GPUs nvidia-smi lists (0 without the driver); no torch import."""
    return len(hardware.gpus(use_torch=False))


def unavailable_reason(
    gpus_needed: int = 1,
    has_module: Callable[[str], bool] = lambda name: importlib.util.find_spec(name) is not None,
    gpu_count: Callable[[], int] = count_nvidia_gpus,
) -> str | None:
    """Why `--engine vllm` cannot run here (one line), or None when it can."""
    if not has_module("vllm"):
        where = "on a machine with an NVIDIA GPU"
        return f"vLLM is not installed (install qwenkit's vllm extra {where}); {FALLBACK}"
    gpus = gpu_count()
    if gpus == 0:
        return f"vLLM needs an NVIDIA GPU and this machine has none (nvidia-smi lists no GPU); {FALLBACK}"
    if gpus < gpus_needed:
        return (
            f"the plan needs {gpus_needed} GPUs on this node but nvidia-smi lists {gpus}; lower "
            "--tensor-parallel x --pipeline-parallel, add --nodes with --ray-address, or " + FALLBACK
        )
    return None


__all__ = ["FALLBACK", "count_nvidia_gpus", "unavailable_reason"]
