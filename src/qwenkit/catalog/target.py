"""What a model reference names, for planning: a catalog entry, a hub id, a local checkpoint or a GGUF.

Contract: resolve_target() never downloads. A catalog name or a hub id the catalog knows (the model's,
its base's, an official quantized repo's) gives the catalog's shape; a local .gguf gives its real
tensors (types and bytes read from the file) so the plan is exact; a local checkpoint directory, or a
hub id already in the local Hugging Face cache, gives its config.json's shape. Anything else raises
TargetError (a ValueError) whose one-line message names the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qwenkit.catalog.formats import TensorLayout, WeightFormat
from qwenkit.catalog.schema import Catalog, Entry
from qwenkit.catalog.shape import ModelShape, ShapeError, TensorSpec

__all__ = ["Target", "TargetError", "resolve_target"]

# GGUF file types (llama.cpp's ftype names) → the planner's format.
_GGUF_FTYPES = {
    "F32": WeightFormat.F32,
    "F16": WeightFormat.FP16,
    "BF16": WeightFormat.BF16,
    "Q8_0": WeightFormat.Q8_0,
    "Q6_K": WeightFormat.Q6_K,
    "Q5_K_M": WeightFormat.Q5_K_M,
    "Q4_K_M": WeightFormat.Q4_K_M,
    "Q4_0": WeightFormat.Q4_0,
}
_QUANT_FORMAT = {
    "gguf": WeightFormat.Q4_K_M,
    "awq": WeightFormat.AWQ_INT4,
    "gptq-int4": WeightFormat.GPTQ_INT4,
    "gptq-int8": WeightFormat.GPTQ_INT8,
    "fp8": WeightFormat.FP8,
}


class TargetError(ValueError):
    """A model reference that cannot be planned; the message is one line naming the fix."""


@dataclass(frozen=True)
class Target:
    """A model to plan: its shape, the catalog entry (if any), a format it implies, real tensors (GGUF)."""

    shape: ModelShape
    label: str
    entry: Entry | None = None
    format_hint: WeightFormat | None = None
    layout: tuple[TensorLayout, ...] | None = None
    gguf_path: Path | None = None
    file_type: str | None = None


def _gguf_target(path: Path) -> Target:
    from qwenkit.gguf.reader import MetadataReader, read_gguf_info

    info = read_gguf_info(path)
    shape = ModelShape.from_gguf_info(info)
    specs = {t.name: t for t in shape.tensors()}
    layout = []
    for t in MetadataReader(path).tensors:
        ne = [int(n) for n in t.shape]
        spec = specs.get(t.name) or TensorSpec(
            t.name, "other", None, ne[0], int(t.n_elements) // max(1, ne[0])
        )
        layout.append(TensorLayout(spec, t.tensor_type.name, int(t.n_bytes)))
    fmt = _GGUF_FTYPES.get(info.file_type_name, WeightFormat.Q4_K_M)
    return Target(
        shape=shape,
        label=path.name,
        format_hint=fmt,
        layout=tuple(layout),
        gguf_path=path,
        file_type=info.file_type_name,
    )


def _dir_target(path: Path) -> Target:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise TargetError(f"no config.json in {path}: pass a checkpoint directory, a .gguf or a catalog name")
    try:
        config = json.loads(config_path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TargetError(f"{config_path} is not valid JSON: re-download the checkpoint") from None
    try:
        return Target(shape=ModelShape.from_config(config, path.name), label=path.name)
    except ShapeError as error:
        raise TargetError(f"{error}: pass a Qwen checkpoint") from None


def resolve_target(ref: str, catalog: Catalog) -> Target:
    """Resolve `ref` for planning (see the module docstring)."""
    ref = ref.strip()
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TargetError(
                f"{path} is a file but not a .gguf: pass a .gguf, a directory or a catalog name"
            )
        return _gguf_target(path)
    if path.is_dir():
        return _dir_target(path)
    found = catalog.find(ref)
    if found is not None:
        entry, quant_key = found
        try:
            shape = entry.shape()
        except ShapeError as error:
            raise TargetError(str(error)) from None
        hint = _QUANT_FORMAT.get(quant_key) if quant_key else None
        return Target(shape=shape, label=entry.name, entry=entry, format_hint=hint)
    return _cached_hub_target(ref)


def _cached_hub_target(ref: str) -> Target:
    from qwenkit.checkpoints.resolve import (
        MODELSCOPE_PREFIX,
        ModelRefError,
        modelscope_cache_candidates,
        resolve_model,
    )

    unknown = TargetError(
        f"{ref!r} is not in the catalog, not a local path and not downloaded: pass a catalog name "
        "(see `qwenkit models catalog`), a checkpoint directory or a .gguf"
    )
    # Offline on purpose: planning happens before anything is downloaded.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if ref.startswith(MODELSCOPE_PREFIX):
        repo = ref[len(MODELSCOPE_PREFIX) :]
        if "/" not in repo:
            raise unknown
        for candidate in modelscope_cache_candidates(repo, env):
            if (candidate / "config.json").is_file():
                return _dir_target(candidate)
        raise unknown
    try:
        resolved = resolve_model(ref, env=env)
    except ModelRefError:
        raise unknown from None
    if resolved.kind == "gguf":
        raise TargetError(f"{ref} resolved to a GGUF file: pass the file itself")
    return _dir_target(resolved.path)
