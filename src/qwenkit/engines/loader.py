"""Open a resolved model reference on the llama.cpp engine, with the tokenizer and chat flavour it needs.

Contract: an HF checkpoint is converted to GGUF once (cached) and keeps its own tokenizer files; a .gguf
file brings its tokenizer in its metadata. Either way the caller gets the same LoadedModel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from qwenkit.chat.flavor import Flavor, flavor_for_model_type
from qwenkit.checkpoints.demo import is_demo_checkpoint
from qwenkit.checkpoints.resolve import ResolvedModel
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.gguf.convert import OutType, ensure_gguf
from qwenkit.gguf.reader import read_gguf_info
from qwenkit.gguf.vocab import tokenizer_from_gguf
from qwenkit.tokenizer.tokenizer import QwenTokenizer


@dataclass(frozen=True)
class ModelFiles:
    """What an engine needs on disk: the GGUF, the tokenizer, the flavour, and names to show."""

    gguf_path: Path
    tokenizer: QwenTokenizer
    flavor: Flavor
    name: str
    is_demo: bool
    n_ctx_train: int | None


def prepare_files(
    resolved: ResolvedModel,
    outtype: OutType = "q8_0",
    env: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ModelFiles:
    """Convert (once) and load the tokenizer; the slow part before an engine starts."""
    if resolved.kind == "gguf":
        info = read_gguf_info(resolved.path)
        return ModelFiles(
            gguf_path=resolved.path,
            tokenizer=tokenizer_from_gguf(resolved.path),
            flavor=flavor_for_model_type(info.architecture),
            name=info.name or resolved.path.stem,
            is_demo=False,
            n_ctx_train=info.context_length,
        )
    gguf_path = ensure_gguf(resolved.path, outtype, env=env, progress=progress)
    config = resolved.config or {}
    return ModelFiles(
        gguf_path=gguf_path,
        tokenizer=QwenTokenizer.from_dir(resolved.path),
        flavor=flavor_for_model_type(resolved.model_type or "qwen3"),
        name=resolved.name,
        is_demo=is_demo_checkpoint(resolved.path),
        n_ctx_train=config.get("max_position_embeddings"),
    )


def open_engine(files: ModelFiles, config: EngineConfig) -> LlamaCppEngine:
    return LlamaCppEngine(files.gguf_path, config)
