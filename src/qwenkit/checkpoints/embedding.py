"""What makes a checkpoint an embedding model (Qwen3-Embedding), and how its vectors are finished.

Contract: embedding_spec_from_dir() reads a sentence-transformers layout (modules.json, 1_Pooling/config.json,
config_sentence_transformers.json, tokenizer.json's post-processor) and embedding_spec_from_gguf() the GGUF
key `{arch}.pooling_type`; each returns an EmbeddingSpec, or None for a generation model. Only last-token
pooling is served (Qwen3-Embedding's); another pooling mode raises EmbeddingSpecError naming it. A text
input is tokenized as plain text and gets the spec's end token (<|endoftext|>, which Qwen3-Embedding's
tokenizer appends itself); token-id inputs are embedded as given. finish() applies Matryoshka truncation
(the first `dims` values) and then L2 normalisation, as Qwen3-Embedding's model card does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwenkit.tokenizer.specials import ENDOFTEXT

POOLING_FILE = "1_Pooling/config.json"
MODULES_FILE = "modules.json"
PROMPTS_FILE = "config_sentence_transformers.json"
# llama.cpp's enum llama_pooling_type (gguf.PoolingType): the one value served here.
GGUF_POOLING_LAST = 3
GGUF_POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
# Qwen3-Embedding: Matryoshka (MRL) dimensions from 32 up to the hidden size (model card).
MRL_MIN_DIMS = 32
# The query instruction of Qwen3-Embedding's config_sentence_transformers.json ("document": no prefix).
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


class EmbeddingSpecError(ValueError):
    """An embedding checkpoint this server cannot serve; the message is one line naming the fix."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """How an embedding model turns tokens into one vector: last-token pooling, then normalised."""

    dims: int  # the hidden size: the full vector's length
    normalize: bool = True
    end_token: str | None = ENDOFTEXT  # appended to every text input
    min_dims: int = MRL_MIN_DIMS  # the smallest Matryoshka truncation the model was trained for
    prompts: Mapping[str, str] = field(default_factory=dict)  # sentence-transformers prompt names → prefixes

    def finish(self, pooled: np.ndarray, dims: int | None = None) -> np.ndarray:
        """The served vector: the first `dims` values (all by default), L2-normalised (float32)."""
        vector = np.asarray(pooled, dtype=np.float32)[: dims or self.dims]
        if self.normalize:
            norm = float(np.linalg.norm(vector))
            vector = vector / norm if norm > 0 else vector
        return vector


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def embedding_spec_from_dir(directory: Path, config: Mapping[str, Any]) -> EmbeddingSpec | None:
    """The spec of a sentence-transformers checkpoint directory; None when it has no pooling module."""
    pooling = _json(directory / POOLING_FILE)
    if not isinstance(pooling, dict):
        return None
    modes = sorted(
        k.removeprefix("pooling_mode_") for k, v in pooling.items() if k.startswith("pooling_mode_") and v
    )
    if modes != ["lasttoken"]:
        raise EmbeddingSpecError(
            f"{directory / POOLING_FILE} asks for {'+'.join(modes) or 'no'} pooling: qwenkit serves "
            "last-token pooling (Qwen3-Embedding) only"
        )
    modules = _json(directory / MODULES_FILE)
    normalize = isinstance(modules, list) and any(
        isinstance(m, dict) and str(m.get("type", "")).endswith(".Normalize") for m in modules
    )
    prompts = _json(directory / PROMPTS_FILE)
    prompts = prompts.get("prompts") if isinstance(prompts, dict) else None
    return EmbeddingSpec(
        dims=int(config["hidden_size"]),
        normalize=normalize,
        end_token=_appended_token(directory / "tokenizer.json"),
        prompts={k: v for k, v in (prompts or {}).items() if isinstance(v, str)},
    )


def _appended_token(tokenizer_file: Path) -> str | None:
    """The special token tokenizer.json's TemplateProcessing post-processor puts after a single text."""
    tokenizer = _json(tokenizer_file)
    post = tokenizer.get("post_processor") if isinstance(tokenizer, dict) else None
    if not isinstance(post, dict) or post.get("type") != "TemplateProcessing":
        return None
    single = post.get("single") or []
    last = single[-1] if single else None
    special = last.get("SpecialToken") if isinstance(last, dict) else None
    return special.get("id") if isinstance(special, dict) else None


def embedding_spec_from_gguf(
    architecture: str, metadata: Mapping[str, Any], dims: int
) -> EmbeddingSpec | None:
    """The spec of a GGUF that declares last-token pooling (Qwen3-Embedding's conventions); None without
    a pooling type."""
    pooling = metadata.get(f"{architecture}.pooling_type")
    if pooling is None or int(pooling) == 0:
        return None
    if int(pooling) != GGUF_POOLING_LAST:
        name = GGUF_POOLING_NAMES.get(int(pooling), str(pooling))
        raise EmbeddingSpecError(
            f"this GGUF asks for {name} pooling: qwenkit serves last-token pooling (Qwen3-Embedding) only"
        )
    return EmbeddingSpec(dims=dims, prompts={"query": QUERY_PROMPT, "document": ""})
