"""create_app(): the FastAPI app of `qwenkit serve` — routes over the handlers, middleware, lifespan.

Contract: one app per engine; everything it keeps (metrics registry, rate-limit buckets, grammar cache,
the ServeContext at app.state.qwenkit) belongs to that app, nothing to the module. The lifespan starts the
engine and, with manage_engine, shuts it down when the app stops. Routes: POST /v1/chat/completions,
POST /v1/completions, POST /v1/messages[/count_tokens] (Anthropic), POST /v1/responses (and GET/DELETE
/v1/responses/{id}), POST /v1/embeddings and /api/* (Ollama) from serve/apis/ (an embedding model answers
the generating routes with 400), GET /v1/models[/{id}] (the model, then each LoRA adapter as
"model:name" with its base as parent), GET /health (no key needed, so it names the model
only when no keys are set; 503 while draining; ?verbose=1 adds checks with advice, see serve/health.py),
GET / (the web console, serve/console.py), GET /metrics, GET /openapi.json (the API document with the request
bodies declared, see serve/openapi.py; it needs the key like every path but /health); /v1/files and
/v1/batches (serve/apis/batches.py; the lifespan resumes unfinished batches and stops them at shutdown).
Bodies are parsed here (JSON content type, strict pydantic models) so every malformed one is a 4xx; parsing
and planning run in worker threads, so no request's CPU work blocks the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from qwenkit.chat.flavor import Flavor
from qwenkit.chat.presets import BUILTIN as BUILTIN_PRESETS
from qwenkit.chat.presets import load_presets, preset_card
from qwenkit.checkpoints.embedding import EmbeddingSpec
from qwenkit.engines.arrivals import WatchesArrivals
from qwenkit.engines.base import Engine
from qwenkit.media.images import VisionSpec
from qwenkit.serve.apis import anthropic, batches, embeddings, ollama, responses
from qwenkit.serve.config import ServeConfig
from qwenkit.serve.console import install_console
from qwenkit.serve.errors import APIError, install_handlers
from qwenkit.serve.handlers import (
    Plan,
    ServeContext,
    plan_chat,
    plan_completion,
    refuse_if_embedding_model,
    respond,
    served_models,
)
from qwenkit.serve.health import health_response
from qwenkit.serve.logprobs import TokenTexts
from qwenkit.serve.logs import AccessMiddleware, RequestInfo, request_info
from qwenkit.serve.metrics import ServeMetrics
from qwenkit.serve.openapi import install_openapi
from qwenkit.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    parse_request,
)
from qwenkit.serve.security import ClientAddressMiddleware, CORSGate, RateLimiter, SecurityMiddleware
from qwenkit.tokenizer.tokenizer import QwenTokenizer

T = TypeVar("T", bound=BaseModel)
ENGINE_SHUTDOWN_TIMEOUT_S = 5.0


async def parse_body(request: Request, model: type[T]) -> T:
    """The JSON body as `model`, or an APIError (415 for a non-JSON content type, 400 for the rest)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise APIError(
                415,
                "send the body as JSON with the header 'Content-Type: application/json'",
                code="unsupported_media_type",
            )
    body = await request.body()
    if not body.strip():
        raise APIError(400, "the body is empty; send a JSON object")
    # Parsing a body of up to max_body_bytes is CPU work: off the event loop, like planning.
    return await run_in_threadpool(parse_request, body, model)


async def run_planned(
    request: Request, ctx: ServeContext, body_type: type[T], planner: Callable[..., Plan], *extra: object
) -> Response:
    """What every generating route does: parse the body, plan it off the event loop (rendering, tokenizing
    and grammar compiles can take seconds), then answer with the engine's events."""
    refuse_if_embedding_model(ctx)  # before the body: its shape does not matter then
    await request.body()  # all of it (Starlette keeps it): a slow upload is not yet on its way to the engine
    with ctx.arrivals.enter() as arrival:  # an idle engine waits for it (engines/arrivals.py)
        body = await parse_body(request, body_type)
        info = _info(request)
        plan = await run_in_threadpool(planner, ctx, body, info, *extra)
        return await respond(ctx, plan, info, request.receive, arrival)


def _info(request: Request) -> RequestInfo:
    info = request_info(request.scope)
    if info is None:  # the app runs without AccessMiddleware only if someone mounts its router elsewhere
        info = RequestInfo(
            id=request.headers.get("x-request-id", "local"), method=request.method, route="", client=None
        )
    return info


def create_app(
    engine: Engine,
    tokenizer: QwenTokenizer,
    flavor: Flavor,
    model_name: str,
    config: ServeConfig | None = None,
    *,
    manage_engine: bool = True,
    clock: Callable[[], float] | None = None,
    embedding: EmbeddingSpec | None = None,
    vision: VisionSpec | None = None,
    adapters: tuple[str, ...] = (),
) -> FastAPI:
    """The OpenAI-compatible app for one engine. clock: the rate limiter's time source (tests);
    embedding: the spec of an embedding model, whose engine is an EmbeddingEngine; vision: the image grid
    of a model served with its vision projector (None: image parts are refused); adapters: the LoRA
    adapter names the engine loaded, served as "model:name"."""
    config = config or ServeConfig()
    metrics = ServeMetrics(engine)
    limiter = RateLimiter(
        config.rate_limit_rpm,
        config.rate_limit_tpm,
        config.auth_failures_per_minute,
        *([clock] if clock else []),
    )
    ctx = ServeContext(
        engine=engine,
        tokenizer=tokenizer,
        flavor=flavor,
        model_name=config.served_model_name or model_name,
        config=config,
        metrics=metrics,
        limiter=limiter,
        texts=TokenTexts(tokenizer),
        presets=load_presets(Path(config.presets_file)) if config.presets_file else BUILTIN_PRESETS,
        embedding=embedding,
        vision=vision,
        adapters=tuple(adapters),
    )

    if isinstance(engine, WatchesArrivals):
        engine.watch_arrivals(ctx.arrivals)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        batch_runner.resume()  # batches a previous run left unfinished go on
        try:
            yield
        finally:
            ctx.begin_drain()
            await batch_runner.stop()  # before abort_all: a stopped batch request reruns, never fails
            ctx.abort_all()
            if manage_engine:
                await asyncio.to_thread(engine.shutdown, ENGINE_SHUTDOWN_TIMEOUT_S)

    app = FastAPI(
        title="qwenkit",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        middleware=[  # outermost first: the client address feeds the log; CORS preflights skip the key
            Middleware(ClientAddressMiddleware, trusted_proxies=config.trusted_proxies),
            Middleware(AccessMiddleware, metrics=metrics),
            *([Middleware(CORSGate, origins=config.cors_origins)] if config.cors_origins else []),
            Middleware(
                SecurityMiddleware,
                api_keys=[k.get_secret_value() for k in config.api_keys],
                limiter=limiter,
                max_body_bytes=config.max_body_bytes,
                body_timeout=config.body_timeout,
                body_caps=batches.body_caps(config.max_batch_file_bytes),
            ),
        ],
    )
    app.state.qwenkit = ctx
    install_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await run_planned(request, ctx, ChatCompletionRequest, plan_chat)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await run_planned(request, ctx, CompletionRequest, plan_completion)

    def card(model_id: str) -> ModelCard:
        parent = None if model_id == ctx.model_name else ctx.model_name  # a LoRA adapter's base model
        sees = ["text", "image"] if ctx.vision is not None else None
        return ModelCard(
            id=model_id, created=ctx.created, max_model_len=engine.n_ctx, parent=parent, input_modalities=sees
        )

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [card(m) for m in served_models(ctx)]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json", exclude_none=True))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id not in served_models(ctx):
            raise APIError(
                404, f"model {model_id!r} is not served here", param="model", code="model_not_found"
            )
        return JSONResponse(card(model_id).model_dump(mode="json", exclude_none=True))

    @app.get("/v1/presets")
    async def presets() -> JSONResponse:  # what the "preset" field accepts (the console lists them)
        return JSONResponse({"object": "list", "data": [preset_card(p) for p in ctx.presets.values()]})

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        return await health_response(request, ctx)  # ?verbose=1: checks with advice (serve/health.py)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    anthropic.install(app, ctx)  # POST /v1/messages[/count_tokens] (serve/apis/anthropic.py)
    ollama.install(app, ctx)  # /api/chat, /api/generate, /api/tags, ... (serve/apis/ollama.py)
    responses.install(app, ctx)  # POST /v1/responses (serve/apis/responses.py)
    embeddings.install(app, ctx)  # POST /v1/embeddings (serve/apis/embeddings.py)
    batch_runner = batches.install(app, ctx)  # /v1/files, /v1/batches (serve/apis/batches.py)
    install_openapi(app, ctx.model_name, config)
    install_console(app)  # GET /: the web console (serve/console.py)
    return app


def serve_context(app: FastAPI) -> ServeContext:
    """The ServeContext of an app made by create_app (for the server runner and tests)."""
    return app.state.qwenkit
