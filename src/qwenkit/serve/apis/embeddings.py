"""The OpenAI embeddings API (`POST /v1/embeddings`) over an embedding engine.

Contract: `input` is a string, a list of strings, a list of token ids or a list of token-id lists (at most
MAX_INPUTS inputs). A text is tokenized as plain text (special-token text stays text) and gets the model's
end token (<|endoftext|> for Qwen3-Embedding, as its own tokenizer does); `prompt_name` (a qwenkit
extension: "query" for Qwen3-Embedding) puts the model's instruction prefix before each text; token ids are
embedded exactly as given. Each input must fit the engine's n_ctx. The engine returns last-token pooled
hidden states, batched in as few calls as fit with the inputs of every other request in flight
(engines/llamacpp/embedder.py); `dimensions` (Matryoshka: the model's min_dims up to its
hidden size) keeps the first values, then the vector is L2-normalised (EmbeddingSpec.finish);
`encoding_format` float gives lists, base64 little-endian float32 bytes (what the openai SDK asks for by
default). usage counts the tokens embedded, which also go through the tokens/minute limit, the access log
and the prompt-token metric. A chat model answers 400 naming the fix; an embedding model answers the chat
routes 400 (serve/app.py). Errors use OpenAI's shape. embed_request() is the native path other APIs
translate onto (Ollama's /api/embed: `truncate` cuts a too-long text to n_ctx tokens, end token kept).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from qwenkit.checkpoints.embedding import EmbeddingSpec
from qwenkit.engines.base import EmbeddingEngine
from qwenkit.engines.request import EngineError
from qwenkit.serve.errors import APIError, from_engine_error, header_safe, shutting_down
from qwenkit.serve.handlers import ServeContext
from qwenkit.serve.logs import RequestInfo
from qwenkit.serve.protocol import MAX_NAME_CHARS

MAX_INPUTS = 2048  # OpenAI's cap on inputs per request
EMBEDDING_MODEL_HINT = "Qwen/Qwen3-Embedding-0.6B"


class EmbeddingsRequest(BaseModel):
    """The body of /v1/embeddings; unknown top-level fields are ignored and named in a warning header."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    prompt_name: str | None = Field(default=None, min_length=1, max_length=64)


@dataclass
class EmbeddingPlan:
    inputs: list[list[int]]
    dims: int | None
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(tokens) for tokens in self.inputs)


def _texts_and_ids(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """Each input: a text or a token-id list (a flat list of ints is one input)."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(
            400, "input: give a string, a list of strings or token ids; not an empty list", param="input"
        )
    if all(isinstance(v, int) for v in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


def plan_embeddings(
    ctx: ServeContext, body: EmbeddingsRequest, info: RequestInfo, truncate: bool = False
) -> EmbeddingPlan:
    """Validate and tokenize an embeddings request (blocking: run it in a worker thread); truncate: a text
    over n_ctx tokens keeps its first ones (and the end token) instead of a 400."""
    if ctx.draining:
        raise shutting_down()
    spec, engine = ctx.embedding, ctx.engine
    if spec is None or not isinstance(engine, EmbeddingEngine):
        raise APIError(
            400,
            f"{ctx.model_name} is a chat model and makes no embeddings; serve an embedding model for "
            f"embeddings, e.g. `qwenkit serve --model {EMBEDDING_MODEL_HINT}`",
            param="model",
            code="not_an_embedding_model",
        )
    if body.model != ctx.model_name:
        raise APIError(
            404,
            f"model {body.model!r} is not served here; use {ctx.model_name!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    info.model = body.model
    if body.user:
        info.user = ctx.hash_user(body.user)
    dims = _dimensions(spec, body.dimensions)
    prefix = _prefix(spec, body.prompt_name)
    items = _texts_and_ids(body.input)
    if len(items) > MAX_INPUTS:
        raise APIError(
            400, f"input: at most {MAX_INPUTS} inputs per request, got {len(items)}", param="input"
        )
    end = [ctx.tokenizer.special_id(spec.end_token)] if spec.end_token else []
    inputs: list[list[int]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"input[{i}] is an empty string; give some text", param="input")
            tokens = ctx.tokenizer.encode_text(prefix + item)
            if truncate and len(tokens) + len(end) > engine.n_ctx:
                tokens = tokens[: engine.n_ctx - len(end)]
            tokens += end
        else:
            tokens = item
            if not tokens:
                raise APIError(400, f"input[{i}] is an empty token list", param="input")
            bad = [t for t in tokens if not 0 <= t < ctx.tokenizer.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"input[{i}]: token id {bad[0]} is outside the vocabulary "
                    f"(0..{ctx.tokenizer.vocab_size - 1})",
                    param="input",
                )
        if len(tokens) > engine.n_ctx:
            raise APIError(
                400,
                f"input[{i}] has {len(tokens)} tokens; this server embeds at most {engine.n_ctx} per input: "
                "split the text or start the server with a larger --ctx",
                param="input",
                code="context_length_exceeded",
            )
        inputs.append(tokens)
    extra = sorted(body.model_extra or {})
    warnings = [f"ignored unknown field(s): {', '.join(extra[:10])}"] if extra else []
    return EmbeddingPlan(inputs, dims, warnings)


def _dimensions(spec: EmbeddingSpec, dims: int | None) -> int | None:
    if dims is not None and not spec.min_dims <= dims <= spec.dims:
        raise APIError(
            400,
            f"dimensions: this model gives {spec.min_dims} to {spec.dims} dimensions (Matryoshka), "
            f"not {dims}",
            param="dimensions",
        )
    return dims


def _prefix(spec: EmbeddingSpec, name: str | None) -> str:
    if name is None:
        return ""
    if name not in spec.prompts:
        known = ", ".join(sorted(spec.prompts)) or "none"
        raise APIError(
            400, f"prompt_name {name!r} is not one of this model's prompts ({known})", param="prompt_name"
        )
    return spec.prompts[name]


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    values = np.asarray(vector, dtype="<f4")
    return base64.b64encode(values.tobytes()).decode("ascii") if encoding == "base64" else values.tolist()


def install(app: FastAPI, ctx: ServeContext) -> None:
    """Add POST /v1/embeddings to an app made by create_app."""
    from qwenkit.serve.app import _info, parse_body  # app.py installs this module: import it late

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = await parse_body(request, EmbeddingsRequest)
        return await answer_embeddings(ctx, body, _info(request))


@dataclass
class Embedded:
    """What the native path hands an API: each input's finished vector, in order, and the counts."""

    vectors: list[np.ndarray]
    tokens: int
    warnings: list[str]


async def embed_request(
    ctx: ServeContext, body: EmbeddingsRequest, info: RequestInfo, truncate: bool = False
) -> Embedded:
    """Plan, rate-limit, embed (batched with concurrent requests) and finish one request's vectors."""
    plan = await run_in_threadpool(plan_embeddings, ctx, body, info, truncate)
    engine, spec = ctx.engine, ctx.embedding
    assert isinstance(engine, EmbeddingEngine) and spec is not None  # plan_embeddings checked both
    info.prompt_tokens = plan.tokens
    info.warnings = plan.warnings
    reservation = ctx.limiter.reserve_tokens(info.rate_key, plan.tokens)
    try:
        pooled = await run_in_threadpool(engine.embed, plan.inputs)
    except EngineError as exc:
        raise from_engine_error(exc) from None
    finally:
        reservation.settle(plan.tokens)
    ctx.metrics.prompt_tokens.inc(plan.tokens)
    return Embedded([spec.finish(v, plan.dims) for v in pooled], plan.tokens, plan.warnings)


async def answer_embeddings(ctx: ServeContext, body: EmbeddingsRequest, info: RequestInfo) -> JSONResponse:
    """The whole answer to one embeddings request (the route's, and a batch line's)."""
    done = await embed_request(ctx, body, info)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
        for i, v in enumerate(done.vectors)
    ]
    usage = {"prompt_tokens": done.tokens, "total_tokens": done.tokens}
    warning = header_safe(" | ".join(done.warnings))
    return JSONResponse(
        {"object": "list", "data": data, "model": ctx.model_name, "usage": usage},
        headers={"x-qwenkit-warning": warning} if warning else {},
    )
