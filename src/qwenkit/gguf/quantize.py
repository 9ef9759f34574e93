"""Quantize a Qwen GGUF with llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python).

Contract: quantize_gguf() reads an f32/f16/bf16 Qwen GGUF and writes `dst` atomically with the llama.cpp
file type for `qtype`; already-quantized inputs are refused (requantizing compounds the error). k-quants
(q4_k_m, q5_k_m, q6_k) need rows whose length is a multiple of 256; llama.cpp quantizes the other tensors
with a fallback type (q5_0, q5_1, q8_0), which read_gguf_info().tensor_types shows. llama.cpp's log is
captured while it runs, so its error lines end up in the QuantizeError (a ValueError) rather than on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, get_args

from qwenkit.gguf.reader import read_gguf_info
from qwenkit.paths import replaced_on_success

__all__ = ["QTYPES", "QuantType", "QuantizeError", "quantize_gguf"]

QuantType = Literal["q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0"]
QTYPES: tuple[str, ...] = get_args(QuantType)
_LLAMA_FTYPE_NAMES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
}
_FLOAT_SOURCES = ("F32", "F16", "BF16")
# ggml.h today: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (llama_cpp._logger lists an older order).
_GGML_LOG_ERROR = 4


class QuantizeError(ValueError):
    """A GGUF that cannot be quantized as asked; the message is one line naming the fix."""


def quantize_gguf(src: Path, dst: Path, qtype: QuantType, threads: int | None = None) -> Path:
    """Quantize the float GGUF `src` to `qtype` at `dst` with `threads` threads (default: all cores)."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if qtype not in QTYPES:
        raise QuantizeError(f"unknown quantization {qtype!r}: use one of {', '.join(QTYPES)}")
    if threads is not None and threads < 1:
        raise QuantizeError(f"threads must be at least 1, got {threads}")
    if dst.suffix.lower() != ".gguf":
        raise QuantizeError(f"output {dst} must end in .gguf: pass a path like model-{qtype}.gguf")
    if dst.exists() and dst.resolve() == src.resolve():
        raise QuantizeError(f"output {dst} is the input file: pass a different output path")
    info = read_gguf_info(src)  # raises a clear error for a missing, non-GGUF or non-Qwen file
    if info.file_type_name not in _FLOAT_SOURCES:
        raise QuantizeError(
            f"{src} is already quantized ({info.file_type_name}): quantize from an f32/f16/bf16 GGUF "
            "(`qwenkit convert --outtype bf16`)"
        )
    try:
        import llama_cpp
    except ImportError:
        raise QuantizeError("quantizing needs llama-cpp-python: pip install 'qwenkit[cpu]'") from None

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads if threads is not None else (os.cpu_count() or 1)
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPE_NAMES[qtype])
    with replaced_on_success(dst) as tmp, _captured_llama_log() as errors:
        status = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            reason = errors[-1] if errors else f"status {status}"
            raise QuantizeError(f"llama.cpp could not quantize {src} to {qtype}: {reason}")
    return dst


@contextlib.contextmanager
def _captured_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's error lines for the block (dropping its chatter), then restore the default log."""
    import llama_cpp
    from llama_cpp import _logger  # its callback is the one llama-cpp-python installs at import

    errors: list[str] = []

    def collect(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace").strip()
        if level == _GGML_LOG_ERROR and line:
            errors.append(line)

    callback = llama_cpp.llama_log_callback(collect)  # kept referenced until restored below
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
