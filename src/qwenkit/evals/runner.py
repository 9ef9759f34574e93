"""Run eval tasks against an OpenAI-compatible endpoint: ask concurrently, cache, split reasoning, score.

Contract: run_eval(config) asks every case of every task through POST /v1/chat/completions (greedy,
non-streaming) with at most config.concurrency requests in flight. --model runs `qwenkit serve`'s app
in-process on a free loopback port (threads: config.threads, default physical cores), so both modes take
one HTTP path. Each answer is cached on disk as soon as it arrives, keyed by (endpoint and model, task,
case, generation parameters): a re-run or an interrupted run asks only what is missing. The answer is
scored after its reasoning is split off: the server's reasoning_content (qwenkit serve splits with the
checkpoint's family parser), else qwenkit's Qwen3 parser on <think>...</think> in the content. A request
that fails (HTTP 4xx/5xx, connection lost, timeout) or a scorer that raises fails that sample with the
error recorded; the run goes on. An unreachable endpoint fails at once with EvalError.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from qwenkit.chat.parse import parse_output
from qwenkit.evals.report import (
    SAMPLE_TEXT_CHARS,
    EvalReport,
    SampleResult,
    summarise,
    write_report,
)
from qwenkit.evals.scorers import Answer, score
from qwenkit.evals.tasks import EvalCase, Task, load_tasks
from qwenkit.paths import atomic_write, cache_root
from qwenkit.tokenizer.specials import THINK_END, THINK_START, TOOL_CALL_START

Progress = Callable[[int, int], None]


class EvalError(ValueError):
    """The eval cannot run (endpoint unreachable, no model to ask); the message names the fix."""


class EvalConfig(BaseModel):
    """What `qwenkit eval` (and `qwenkit compare`) asks for; exactly one of model / base_url."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    served_model: str | None = None
    tasks: list[str] = Field(default_factory=list)
    data: Path | None = None
    limit: int | None = Field(default=None, ge=1)
    seed: int = 0
    concurrency: int = Field(default=4, ge=1, le=256)
    max_tokens: int = Field(default=1024, ge=1)
    thinking: bool | None = None  # None: the server's default
    out: Path | None = None
    cache: bool = True
    cache_dir: Path | None = None  # default: <qwenkit cache>/evals
    threads: int | None = Field(default=None, ge=1)  # --model only
    quant: str = "q8_0"  # --model only: what an HF checkpoint is converted to
    request_timeout_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _one_target(self) -> EvalConfig:
        if (self.model is None) == (self.base_url is None):
            raise ValueError("give either --model (run it here) or --base-url (an OpenAI-compatible server)")
        return self

    def params(self) -> dict[str, Any]:
        """The generation parameters that change an answer (part of the cache key)."""
        return {
            "max_tokens": self.max_tokens,
            "thinking": self.thinking,
            "temperature": 0.0,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Endpoint:
    root: str  # without /v1
    model: str
    api_key: str | None
    key: str  # what identifies the answers' source in the cache

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def api_root(base_url: str) -> str:
    """A base URL without a trailing slash or /v1: http://host:8000/v1/ -> http://host:8000."""
    root = base_url.strip().rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise EvalError(f"--base-url {base_url!r} must start with http:// or https://")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _served_models(root: str, headers: dict[str, str]) -> list[str]:
    try:
        reply = httpx.get(f"{root}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise EvalError(f"cannot reach {root} ({exc}); is the server running? check --base-url") from None
    if reply.status_code in (401, 403):
        raise EvalError(f"{root} refused the request (HTTP {reply.status_code}): pass its key with --api-key")
    if reply.status_code >= 400:
        return []
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return [str(m["id"]) for m in reply.json()["data"]]
    return []


def remote_endpoint(config: EvalConfig) -> Endpoint:
    """The --base-url endpoint, checked reachable; the model is --served-model or the server's first."""
    assert config.base_url is not None
    root = api_root(config.base_url)
    key = config.api_key.get_secret_value() if config.api_key else None
    models = _served_models(root, {"Authorization": f"Bearer {key}"} if key else {})
    model = config.served_model or (models[0] if models else None)
    if model is None:
        raise EvalError(f"{root}/v1/models lists no model: name the one to ask with --served-model")
    return Endpoint(root, model, key, f"{root}|{model}")


@contextlib.contextmanager
def local_endpoint(config: EvalConfig) -> Iterator[Endpoint]:
    """`qwenkit serve`'s app for --model on 127.0.0.1 (a free port) in a background thread."""
    from qwenkit.checkpoints.resolve import resolve_model
    from qwenkit.engines.llamacpp.config import EngineConfig
    from qwenkit.engines.loader import open_engine, prepare_files
    from qwenkit.hardware import physical_cores
    from qwenkit.serve.app import create_app
    from qwenkit.serve.config import ServeConfig
    from qwenkit.serve.server import bind_socket, make_server

    assert config.model is not None
    files = prepare_files(resolve_model(config.model), config.quant)  # type: ignore[arg-type]
    # Room per request for the prompt and the answer; all `concurrency` requests decode together.
    per_request = max(4096, config.max_tokens + 2048)
    engine_config = EngineConfig.for_workload(
        config.concurrency,
        per_request,
        files.n_ctx_train,
        threads=config.threads or physical_cores(),
        max_waiting=max(64, config.concurrency),
    )
    engine = open_engine(files, engine_config)
    app = create_app(engine, files.tokenizer, files.family, files.name, ServeConfig())  # type: ignore[arg-type]
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(app, shutdown_timeout=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="eval-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise EvalError(f"the in-process server for {config.model} did not start")
            time.sleep(0.02)
        # The GGUF's size and time stand for its content: a re-converted model is asked again.
        stat = files.gguf_path.stat()
        key = f"model:{files.gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|{files.name}"
        yield Endpoint(f"http://127.0.0.1:{port}", files.name, None, key)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


class AnswerCache:
    """One JSON file per answer under root, written atomically; disabled: never read nor written."""

    def __init__(self, root: Path, enabled: bool = True) -> None:
        self.root = root
        self.enabled = enabled

    @staticmethod
    def key(endpoint: str, task: str, case: EvalCase, params: dict[str, Any]) -> str:
        data = json.dumps([endpoint, task, case.fingerprint(), params], sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        try:
            value = json.loads(self._path(key).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write(self._path(key), json.dumps(record))


class RequestFailed(Exception):
    """One request failed; the message goes into that sample's error."""


def _error_message(reply: httpx.Response) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        return str(reply.json()["error"]["message"])[:200]
    return reply.text[:200]


async def _ask(client: httpx.AsyncClient, endpoint: Endpoint, case: EvalCase, config: EvalConfig) -> dict:
    body: dict[str, Any] = {
        "model": endpoint.model,
        "messages": case.messages,
        "max_tokens": config.max_tokens,
        "temperature": 0.0,
        "seed": config.seed,
    }
    if case.tools:
        body["tools"] = case.tools
    if config.thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": config.thinking}
    try:
        reply = await client.post(
            f"{endpoint.root}/v1/chat/completions", json=body, headers=endpoint.headers()
        )
    except httpx.HTTPError as exc:
        raise RequestFailed(f"{type(exc).__name__}: {exc}"[:200]) from None
    if reply.status_code >= 400:
        raise RequestFailed(f"HTTP {reply.status_code}: {_error_message(reply)}")
    try:
        choice = reply.json()["choices"][0]
        usage = reply.json().get("usage") or {}
        return {"message": choice["message"], "finish_reason": choice.get("finish_reason"), "usage": usage}
    except (ValueError, KeyError, IndexError, TypeError):
        raise RequestFailed(f"not a chat completion: {reply.text[:120]!r}") from None


@dataclass(frozen=True)
class Split:
    answer: Answer
    in_thinking: bool  # generation ended inside the think block


def split_answer(record: dict[str, Any], tools: list[dict[str, Any]] | None = None) -> Split:
    """The scored answer of a chat completion: reasoning from reasoning_content (or reasoning), else split
    off <think>...</think> with qwenkit's Qwen3 parser, which also reads Hermes tool calls in the text."""
    message = record.get("message") or {}
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    calls = [
        {"name": c["function"].get("name"), "arguments": c["function"].get("arguments", "{}")}
        for c in message.get("tool_calls") or []
        if isinstance(c, dict) and isinstance(c.get("function"), dict)
    ]
    cut = record.get("finish_reason") == "length"
    has_tags = THINK_START in content or THINK_END in content
    if reasoning is None and (has_tags or (TOOL_CALL_START in content and not calls)):
        # Output that closes a block it did not open: the prompt opened it (Qwen3-2507 Thinking, QwQ).
        opened = THINK_END in content and THINK_START not in content.split(THINK_END, 1)[0]
        parsed = parse_output(content, thinking=has_tags, think_opened=opened, tools=None if calls else tools)
        if not calls:
            calls = [{"name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]
        answer = Answer(parsed.content or "", calls, parsed.reasoning or "")
        return Split(answer, cut and parsed.reasoning_truncated)
    reasoning = reasoning or ""
    # A server that splits reasoning shows a cut inside thinking as reasoning with no answer after it.
    return Split(
        Answer(content, calls, reasoning), cut and bool(reasoning) and not content.strip() and not calls
    )


def _sample(task: str, case: EvalCase, record: dict[str, Any], cached: bool) -> SampleResult:
    split = split_answer(record, case.tools)
    usage = record.get("usage") or {}
    details = usage.get("completion_tokens_details") or {}
    result = SampleResult(
        task=task,
        id=case.id,
        scorer=case.scorer,
        content=split.answer.content[:SAMPLE_TEXT_CHARS],
        reasoning_chars=len(split.answer.reasoning),
        reasoning_tokens=details.get("reasoning_tokens") if isinstance(details, dict) else None,
        completion_tokens=usage.get("completion_tokens"),
        finish_reason=record.get("finish_reason"),
        cut_off=record.get("finish_reason") == "length",
        cut_off_in_thinking=split.in_thinking,
        cached=cached,
    )
    try:
        got = score(split.answer, case)
    except Exception as exc:  # a scorer that crashes fails this sample only
        result.error = f"scorer {case.scorer} failed: {type(exc).__name__}: {exc}"[:300]
        return result
    result.score, result.detail = got.value, got.detail
    return result


async def _run_all(
    tasks: list[Task], endpoint: Endpoint, config: EvalConfig, cache: AnswerCache, progress: Progress | None
) -> tuple[list[SampleResult], int]:
    jobs = [(task.name, case) for task in tasks for case in task.cases]
    total, done, sent = len(jobs), 0, 0
    gate = asyncio.Semaphore(config.concurrency)
    params = config.params()
    if progress:
        progress(0, total)

    async def one(client: httpx.AsyncClient, task: str, case: EvalCase) -> SampleResult:
        nonlocal done, sent
        key = AnswerCache.key(endpoint.key, task, case, params)
        record = cache.get(key)
        cached, error = record is not None, ""
        if record is None:
            async with gate:
                sent += 1
                try:
                    record = await _ask(client, endpoint, case, config)
                except RequestFailed as exc:
                    record = None
                    error = str(exc)
            if record is not None:
                cache.put(key, record)
        if record is None:
            result = SampleResult(task=task, id=case.id, scorer=case.scorer, error=error)
        else:
            # Scoring may run a sandboxed subprocess: off the event loop.
            result = await asyncio.to_thread(_sample, task, case, record, cached)
        done += 1
        if progress:
            progress(done, total)
        return result

    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(timeout=config.request_timeout_s, limits=limits) as client:
        results = await asyncio.gather(*(one(client, task, case) for task, case in jobs))
    return list(results), sent


def run_eval(config: EvalConfig, progress: Progress | None = None) -> EvalReport:
    """Run the configured tasks; write eval.json + eval.html into config.out when given."""
    tasks = load_tasks(config.tasks, config.data, config.seed, config.limit)
    cache = AnswerCache(config.cache_dir or cache_root() / "evals" / "answers", config.cache)
    started = time.monotonic()
    with (
        local_endpoint(config)
        if config.model is not None
        else contextlib.nullcontext(remote_endpoint(config))
    ) as endpoint:
        samples, sent = asyncio.run(_run_all(tasks, endpoint, config, cache, progress))
    report = EvalReport(
        endpoint=endpoint.root if config.base_url else f"in-process qwenkit serve ({config.model})",
        model=endpoint.model,
        params={**config.params(), "concurrency": config.concurrency, "limit": config.limit},
        tasks={t.name: summarise(t.name, [s for s in samples if s.task == t.name]) for t in tasks},
        samples=samples,
        requests_sent=sent,
        answers_from_cache=sum(s.cached for s in samples),
        wall_s=time.monotonic() - started,
    )
    if config.out is not None:
        write_report(report, config.out)
    return report
