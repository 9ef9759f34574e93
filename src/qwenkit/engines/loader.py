"""Open a resolved model reference on the llama.cpp engine, with the tokenizer and chat family it needs.

Contract: an HF checkpoint is converted to GGUF once (cached) and keeps its own tokenizer files; a .gguf
file brings its tokenizer in its metadata. Either way the caller gets the same ModelFiles. The chat family
comes from the checkpoint's own chat template (GGUF tokenizer.chat_template, else chat_template.jinja /
tokenizer_config.json), model_type only when there is none; a template that cannot be rendered fails here
(ChatTemplateError), not at the first request. `flavor` is the legacy model_type flavour. An embedding
model (sentence-transformers last-token pooling, or a GGUF's pooling_type) carries its EmbeddingSpec and
opens as a LlamaEmbedder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwenkit.chat.families import ChatFamily, choose_family, template_from_dir
from qwenkit.chat.flavor import Flavor, flavor_for_model_type
from qwenkit.checkpoints.demo import is_demo_checkpoint
from qwenkit.checkpoints.embedding import (
    EmbeddingSpec,
    EmbeddingSpecError,
    embedding_spec_from_dir,
    embedding_spec_from_gguf,
)
from qwenkit.checkpoints.resolve import ModelRefError, ResolvedModel
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.embedder import LlamaEmbedder
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.gguf.convert import OutType, ensure_gguf, flat_text_config
from qwenkit.gguf.mmproj import resolve_mmproj
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
    family: ChatFamily
    warnings: tuple[str, ...] = ()
    mmproj_path: Path | None = None  # the vision projector GGUF, when images were asked for
    embedding: EmbeddingSpec | None = None  # set for an embedding model (Qwen3-Embedding)


def prepare_files(
    resolved: ResolvedModel,
    outtype: OutType = "q8_0",
    env: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    mmproj: Path | Literal["auto"] | None = None,
) -> ModelFiles:
    """Convert (once) and load the tokenizer; the slow part before an engine starts. `mmproj`: a projector
    GGUF file, "auto" (convert the checkpoint's vision tower) or None (text only)."""
    mmproj_path = resolve_mmproj(resolved, mmproj, outtype, env)  # first: a wrong file fails at once
    if resolved.kind == "gguf":
        info = read_gguf_info(resolved.path)
        family, warnings = choose_family(info.chat_template, info.architecture)
        return ModelFiles(
            gguf_path=resolved.path,
            tokenizer=tokenizer_from_gguf(resolved.path),
            flavor=flavor_for_model_type(info.architecture),
            name=info.name or resolved.path.stem,
            is_demo=False,
            n_ctx_train=info.context_length,
            family=family,
            warnings=tuple(warnings),
            mmproj_path=mmproj_path,
            embedding=_spec(
                lambda: embedding_spec_from_gguf(info.architecture, info.metadata, info.embedding_length)
            ),
        )
    # The template is checked before the (slow) conversion, so a broken one fails at once.
    family, warnings = choose_family(template_from_dir(resolved.path), resolved.model_type or "qwen3")
    gguf_path = ensure_gguf(resolved.path, outtype, env=env, progress=progress)
    config = flat_text_config(resolved.config or {})  # a multimodal config nests it in text_config
    return ModelFiles(
        gguf_path=gguf_path,
        tokenizer=QwenTokenizer.from_dir(resolved.path),
        flavor=flavor_for_model_type(resolved.model_type or "qwen3"),
        name=resolved.name,
        is_demo=is_demo_checkpoint(resolved.path),
        n_ctx_train=config.get("max_position_embeddings"),
        family=family,
        warnings=tuple(warnings),
        mmproj_path=mmproj_path,
        embedding=_spec(lambda: embedding_spec_from_dir(resolved.path, config)),
    )


def _spec(read: Callable[[], EmbeddingSpec | None]) -> EmbeddingSpec | None:
    try:
        return read()
    except EmbeddingSpecError as exc:
        raise ModelRefError(str(exc)) from None


def open_engine(files: ModelFiles, config: EngineConfig) -> LlamaCppEngine | LlamaEmbedder:
    """The generation engine, or for an embedding model its embedding context. A projector found by
    prepare_files (files.mmproj_path) goes into the engine's config, unless the config names one."""
    if files.embedding is not None:
        return LlamaEmbedder(files.gguf_path, config)
    if files.mmproj_path is not None and config.mmproj is None:
        config = config.model_copy(update={"mmproj": files.mmproj_path})
    return LlamaCppEngine(files.gguf_path, config)
