"""Running batch lines: through the server's native path in this process, or against a server over HTTP.

Contract: NativeExecutor(ctx) answers one BatchLine exactly as `qwenkit serve` answers the same body at
that url (parse_request → plan_chat / plan_completion / plan_responses → respond, or the embeddings
route's own answer; streaming is refused per line), as an output record; 429/503 are waited out
(Retry-After), and a draining server raises BatchInterrupted instead of recording a failure. HTTPExecutor
POSTs the line to a server the same way, giving up on the run (BatchInterrupted) when it stays
unavailable, cannot be reached or refuses the API key, so no line is recorded as failed for the server's
sake. run_lines() runs the lines not done yet with at most `concurrency` in flight (the engine's scheduler
batches whatever is in flight), hands each record to `sink` as it completes, and reports (done, total,
tokens); setting `stop` ends it early, the in-flight lines aborted and not recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel

from qwenkit.batch.format import BatchLine, answered, refused, succeeded, usage_of
from qwenkit.serve.apis.embeddings import EmbeddingsRequest, answer_embeddings
from qwenkit.serve.apis.responses import ResponsesRequest, plan_responses
from qwenkit.serve.errors import APIError
from qwenkit.serve.handlers import Plan, ServeContext, plan_chat, plan_completion, respond
from qwenkit.serve.logs import RequestInfo
from qwenkit.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_request

RETRY_STATUSES = (429, 503)
MAX_WAIT_S = 30.0  # longest single wait on a Retry-After
HTTP_ATTEMPTS = 8  # tries of one line against a server that keeps answering 429/503


class BatchInterrupted(Exception):
    """The run cannot go on (server unreachable or shutting down); what is done stays done."""


@dataclass(frozen=True)
class Endpoint:
    body_type: type[BaseModel]
    planner: Callable[..., Plan] | None  # planned, then answered by handlers.respond
    extra: tuple[object, ...] = ()
    answer: Callable[..., Awaitable[Any]] | None = None  # or answered whole by the route's own function


# The urls a batch line may target, each planned exactly as its server route plans it.
NATIVE_ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(ChatCompletionRequest, plan_chat),
    "/v1/completions": Endpoint(CompletionRequest, plan_completion),
    "/v1/responses": Endpoint(ResponsesRequest, plan_responses, (None,)),  # no previous_response_id store
    "/v1/embeddings": Endpoint(EmbeddingsRequest, None, answer=answer_embeddings),
}
# What an embedding model's server or engine answers (every other url generates).
EMBEDDING_ENDPOINTS = ("/v1/embeddings",)

Executor = Callable[[BatchLine], Awaitable[dict[str, Any]]]


def _retry_after(headers: Mapping[str, str], attempt: int) -> float:
    try:
        wait = float(headers.get("retry-after", ""))
    except ValueError:
        wait = 0.5 * 2**attempt
    return min(max(wait, 0.05), MAX_WAIT_S)


class NativeExecutor:
    """One line through the native request path of `ctx` (the in-process engine or the server's own)."""

    def __init__(self, ctx: ServeContext, key_id: str | None = None, override_model: bool = False) -> None:
        """key_id: whose rate limits the lines count against; override_model: every line runs on ctx's model
        whatever model it names (the CLI: the model is --model's), else a line naming another gets 404."""
        self.ctx = ctx
        self.key_id = key_id
        self.override_model = override_model

    async def __call__(self, line: BatchLine) -> dict[str, Any]:
        endpoint = NATIVE_ENDPOINTS[line.url]
        body = dict(line.body)
        if self.override_model:
            body["model"] = self.ctx.model_name
        attempt = 0
        while True:
            info = RequestInfo(
                id=uuid.uuid4().hex, method="POST", route=line.url, client=None, key_id=self.key_id
            )
            try:
                if body.get("stream"):
                    raise APIError(400, "stream: a batch request cannot stream; drop stream", param="stream")
                raw = json.dumps(body).encode("utf-8")
                parsed = await asyncio.to_thread(parse_request, raw, endpoint.body_type)
                if endpoint.answer is not None:
                    response = await endpoint.answer(self.ctx, parsed, info)
                else:
                    plan = await asyncio.to_thread(endpoint.planner, self.ctx, parsed, info, *endpoint.extra)
                    response = await respond(self.ctx, plan, info, None)
                if self.ctx.draining:  # the answer may have been cut off by the shutdown: run it again later
                    raise BatchInterrupted("the server is shutting down")
                return answered(line, response.status_code, json.loads(response.body), info.id)
            except APIError as err:
                if self.ctx.draining:
                    raise BatchInterrupted("the server is shutting down") from None
                if err.status not in RETRY_STATUSES:
                    return answered(line, err.status, err.body(), info.id)
                await asyncio.sleep(_retry_after(err.headers, attempt))  # wait for room, never fail for it
                attempt = min(attempt + 1, 6)


class HTTPExecutor:
    """One line POSTed to a server (its base URL, with or without /v1), 429/503 retried."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client = client
        base = base_url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base

    async def __call__(self, line: BatchLine) -> dict[str, Any]:
        if line.body.get("stream"):
            err = APIError(400, "stream: a batch request cannot stream; drop stream", param="stream")
            return answered(line, 400, err.body(), "")
        for attempt in range(HTTP_ATTEMPTS):
            try:
                response = await self.client.post(self.base + line.url, json=dict(line.body))
            except httpx.HTTPError as exc:
                raise BatchInterrupted(f"cannot reach {self.base}: {exc or type(exc).__name__}") from None
            if response.status_code == 401:  # every line would fail the same way: stop, record nothing
                raise BatchInterrupted(f"{self.base} refused the API key; pass the right --api-key")
            if response.status_code not in RETRY_STATUSES:
                try:
                    body: Any = response.json()
                except ValueError:
                    body = response.text
                return answered(line, response.status_code, body, response.headers.get("x-request-id", ""))
            await asyncio.sleep(_retry_after(response.headers, attempt))
        raise BatchInterrupted(f"{self.base} answered {response.status_code} {HTTP_ATTEMPTS} times in a row")


@dataclass
class Progress:
    done: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = 0.0
    ended: float | None = None  # set when run_lines returns: the rate covers the run only

    def add(self, record: Mapping[str, Any]) -> None:
        self.done += 1
        if succeeded(record):
            self.succeeded += 1
        else:
            self.failed += 1
        prompt, completion = usage_of(record)
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def tokens_per_s(self) -> float:
        elapsed = (self.ended or time.perf_counter()) - self.started
        return self.completion_tokens / elapsed if elapsed > 0 else 0.0


async def run_lines(
    lines: Sequence[BatchLine],
    execute: Executor,
    sink: Callable[[dict[str, Any]], None],
    concurrency: int,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Progress:
    """Run `lines` (the ones left to do) with at most `concurrency` in flight; records go to sink as they
    complete. BatchInterrupted (or an error from sink) stops the rest; `stop` set: ends early, quietly."""
    progress = Progress(started=time.perf_counter())
    pending = iter(lines)

    async def worker() -> None:
        for line in pending:  # one shared iterator: each line is taken by exactly one worker
            if stop is not None and stop.is_set():
                return
            record = refused(line) if line.error is not None else await execute(line)
            sink(record)
            progress.add(record)
            if on_progress is not None:
                on_progress(progress)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(concurrency, len(lines))))]
    waiter = asyncio.create_task(stop.wait()) if stop is not None else None
    try:
        running: set[asyncio.Task[Any]] = set(workers)
        while running:
            watch = running | ({waiter} if waiter is not None else set())
            finished, _ = await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
            if waiter is not None and waiter in finished:
                break  # cancelled: in-flight lines are aborted below and not recorded
            for task in finished:
                running.discard(task)
                task.result()  # BatchInterrupted or a sink error: stop everything
    finally:
        progress.ended = time.perf_counter()
        tasks = [*workers, *([waiter] if waiter is not None else [])]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
    return progress
