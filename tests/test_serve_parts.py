"""Server building blocks on their own: the serve command's options and errors, tool-call grammars,
rate-limit buckets, key handling, error bodies, logprob token bytes."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from qwenkit.chat.messages import Tool
from qwenkit.cli import serve as serve_module
from qwenkit.cli.common import check_kv
from qwenkit.cli.serve import default_ctx, read_api_keys, serve_command
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.request import GrammarError, TokenLogprob
from qwenkit.serve.app import serve_context
from qwenkit.serve.errors import APIError
from qwenkit.serve.logprobs import TokenTexts, chat_logprobs
from qwenkit.serve.logs import UserHasher, key_id
from qwenkit.serve.security import MAX_TRACKED_CLIENTS, RateLimiter, SecurityMiddleware, TokenBucket
from qwenkit.serve.server import ServeError, bind_socket
from qwenkit.serve.tools import (
    GrammarCache,
    ToolChoiceError,
    plan_tools,
    tool_call_grammar,
    tool_calls_schema,
)
from qwenkit.tokenizer.tokenizer import QwenTokenizer

runner = CliRunner()


def serve_cli(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.callback()(lambda: None)  # keep "serve" a subcommand, as in the real app
    result = runner.invoke(app, ["serve", *args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_serve_help_lists_the_options() -> None:
    code, out = serve_cli("--help")
    assert code == 0
    for option in (
        "--host",
        "--port",
        "--api-key",
        "--api-key-file",
        "--max-seqs",
        "--ctx",
        "--threads",
        "--quant",
        "--rate-limit-rpm",
        "--rate-limit-tpm",
        "--bad-key-rpm",
        "--log-content",
        "--served-model-name",
        "--shutdown-timeout",
        "--kv",
        "--flash-attn",
        "QWENKIT_API_KEY",
    ):
        assert option in out, option


def test_serve_refuses_bad_setups_in_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n\n")
    code, out = serve_cli("--api-key-file", str(empty))
    assert code == 2 and "has no keys" in out and "Traceback" not in out
    code, out = serve_cli("--api-key", "short")
    assert code == 2 and "at least 8 characters" in out
    code, out = serve_cli("--quant", "q2_k")
    assert code == 2 and "--quant" in out
    code, out = serve_cli("--kv", "q4_0")
    assert code == 2 and "--kv must be one of f32, f16, q8_0" in out
    code, out = serve_cli("--kv", "q8_0", "--flash-attn", "off")
    assert code == 2 and "--kv q8_0 needs flash attention" in out
    code, out = serve_cli("--flash-attn", "yes")
    assert code == 2 and "--flash-attn must be auto, on or off" in out
    code, out = serve_cli("--engine", "vllm", "--kv", "q8_0")
    assert code == 2 and "--kv is a llama.cpp option" in out
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, out = serve_cli("--port", str(busy.getsockname()[1]))
    assert code == 2 and "cannot listen" in out and "--port" in out


def test_serve_kv_and_flash_attention_reach_the_engine(
    demo_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flags `qwenkit select` and `plan` put in their commands: a q8_0 KV cache (the small demo: q8_0
    needs head dims divisible by 32) with flash attention forced on serves a completion."""
    served: list[FastAPI] = []
    monkeypatch.setattr(serve_module, "announce_and_run", lambda app, *a, **k: served.append(app))
    small = str(demo_checkpoint("qwen3", "small"))
    flags = ("--kv", "q8_0", "--flash-attn", "on", "--threads", "1", "--ctx", "1024")
    code, out = serve_cli("--model", small, "--port", "0", *flags)
    assert code == 0, out
    with TestClient(served[-1]) as client:
        engine = serve_context(served[-1]).engine
        assert isinstance(engine, LlamaCppEngine)
        assert (engine.config.kv_type, engine.config.flash_attn) == ("q8_0", True)
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    assert check_kv("f16", "off") == ("f16", False) and check_kv("q8_0", "auto") == ("q8_0", None)


def test_api_keys_from_option_and_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-aaaaaaaaaaaa\n\n  sk-bbbbbbbbbbbb  \n")
    assert read_api_keys("sk-cccccccccccc", keys) == ["sk-cccccccccccc", "sk-aaaaaaaaaaaa", "sk-bbbbbbbbbbbb"]
    assert read_api_keys(None, None) == []
    with pytest.raises(ValueError):
        read_api_keys("has a space in it", None)


def test_default_context() -> None:
    assert default_ctx(8, 40960) == 8 * 4096
    assert default_ctx(2, 2048) == 2 * 2048  # never past what the model was trained for
    assert default_ctx(1, None) == 4096


def test_bind_socket_errors() -> None:
    with pytest.raises(ServeError, match="cannot resolve"):
        bind_socket("no-such-host.invalid", 0)
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


WEATHER = Tool(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"place": {"$ref": "#/$defs/place"}},
                "required": ["place"],
                "$defs": {
                    "place": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    }
                },
            },
        },
    }
)
CLOCK = Tool({"type": "function", "function": {"name": "get_time"}})


def test_tool_schema_hoists_parameters_and_rebases_refs() -> None:
    schema = tool_calls_schema([WEATHER, CLOCK])
    first, second = schema["anyOf"]
    assert first["properties"]["name"] == {"const": "get_weather"}
    assert first["properties"]["arguments"] == {"$ref": "#/$defs/qk_tool_0"}
    hoisted = schema["$defs"]["qk_tool_0"]
    assert hoisted["properties"]["place"] == {"$ref": "#/$defs/qk_tool_0/$defs/place"}
    assert schema["$defs"]["qk_tool_1"] == {"type": "object"}  # no parameters: any object
    assert second["required"] == ["name", "arguments"] and second["additionalProperties"] is False


def test_tool_grammar_uses_the_added_tokens_and_unique_rule_names() -> None:
    grammar = tool_call_grammar([WEATHER, CLOCK])
    assert grammar.after_think and grammar.root == "qk-calls"
    assert 'qk-call ::= <tool_call> "\\n" root "\\n" </tool_call>' in grammar.gbnf
    assert 'qk-calls ::= "\\n"? "\\n"? qk-call ("\\n" qk-call)*' in grammar.gbnf
    single = tool_call_grammar([CLOCK], parallel=False)
    assert single.gbnf.rstrip().endswith('qk-calls ::= "\\n"? "\\n"? qk-call')
    clash = Tool(
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {"x": {"$ref": "#/$defs/qk-call"}},
                    "$defs": {
                        "qk-call": {
                            "type": "object",
                            "properties": {"a": {"type": "integer"}},
                            "required": ["a"],
                        }
                    },
                },
            },
        }
    )
    renamed = tool_call_grammar([clash])
    assert renamed.root == "qk-calls" and "qk-call1 ::= <tool_call>" in renamed.gbnf


def test_plan_tools_modes_and_errors() -> None:
    cache = GrammarCache()
    assert plan_tools([WEATHER], None, None, True, cache).mode == "auto"
    none = plan_tools([WEATHER], "none", None, True, cache)
    assert none.render == [] and none.grammar is None and none.names == frozenset()
    named = plan_tools([WEATHER, CLOCK], "named", "get_time", True, cache)
    assert (
        named.names == {"get_time"} and named.grammar is not None and "get_weather" not in named.grammar.gbnf
    )
    assert plan_tools([], "auto", None, True, cache).mode == "none"
    with pytest.raises(ToolChoiceError):
        plan_tools([], "required", None, True, cache)
    with pytest.raises(ToolChoiceError):
        plan_tools([WEATHER], "named", "nope", True, cache)


def test_grammar_cache_remembers_failures() -> None:
    cache = GrammarCache(size=2)
    calls = []

    def bad() -> object:
        calls.append(1)
        raise GrammarError("no")

    for _ in range(3):
        with pytest.raises(GrammarError):
            cache.get("x", bad)  # type: ignore[arg-type]
    assert len(calls) == 1
    cache.json_schema({"type": "object"})
    cache.json_schema({"type": "string"})
    with pytest.raises(GrammarError):  # evicted (size 2), built again
        cache.get("x", bad)  # type: ignore[arg-type]
    assert len(calls) == 2


def test_token_bucket_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(rpm=60, tpm=None, clock=lambda: now[0])
    for _ in range(60):
        limiter.admit("a")
    with pytest.raises(APIError) as refused:
        limiter.admit("a")
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    now[0] += 1.0
    limiter.admit("a")
    RateLimiter(None, None).admit("anyone")  # no limits: never refused


def test_token_bucket_memory_is_bounded() -> None:
    now = [0.0]
    bucket = TokenBucket(10, clock=lambda: now[0])
    for i in range(MAX_TRACKED_CLIENTS + 50):
        bucket.take(f"c{i}", 1)
    assert len(bucket._buckets) <= MAX_TRACKED_CLIENTS


def test_authenticate_compares_every_key() -> None:
    middleware = SecurityMiddleware(
        None, ["sk-first-000000", "sk-second-00000"], RateLimiter(None, None), 1024
    )  # type: ignore[arg-type]
    header = [(b"authorization", b"Bearer sk-second-00000")]
    assert middleware.authenticate(header) == key_id("sk-second-00000")
    assert middleware.authenticate([(b"Authorization", b"bearer  sk-first-000000 ")]) == key_id(
        "sk-first-000000"
    )
    assert middleware.authenticate([(b"authorization", b"Bearer sk-first-00000")]) is None
    assert middleware.authenticate(header * 2) is None  # two Authorization headers: refused
    assert middleware.authenticate([(b"authorization", "Bearer ключ".encode())]) is None
    assert key_id("sk-second-00000").startswith("key-") and "second" not in key_id("sk-second-00000")


def test_user_hash_is_keyed_and_stable() -> None:
    first, second = UserHasher(), UserHasher()
    assert first("alice") == first("alice") != first("bob")
    assert first("alice") != second("alice")  # a per-server key: not a plain hash anyone can recompute


def test_error_messages_are_short_and_one_line() -> None:
    err = APIError(400, "bad: " + "x" * 10_000 + "\nsecond line", param="p" * 500)
    body = err.body()["error"]
    assert len(body["message"] or "") <= 300 and "\n" not in (body["message"] or "")
    assert len(body["param"] or "") <= 80 and body["type"] == "invalid_request_error"
    assert (
        APIError(401, "no").type == "authentication_error"
        and APIError(429, "slow").type == "rate_limit_error"
    )
    assert APIError(503, "busy").type == "overloaded_error" and APIError(500, "bug").type == "server_error"
    assert json.loads(err.response().body)["error"]["message"] == body["message"]


def test_token_texts_give_exact_bytes(demo_checkpoint: object) -> None:
    tokenizer = QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))  # type: ignore[operator]
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("é<think>")
    joined = b"".join(bytes(texts.get(i)[1]) for i in ids)
    assert joined == "é<think>".encode()
    # A character split across tokens: each token's text is partial, its bytes exact.
    emoji = tokenizer.encode_text("🦙")
    assert b"".join(bytes(texts.get(i)[1]) for i in emoji) == "🦙".encode()
    entries = chat_logprobs(texts, [TokenLogprob(ids[0], -1.0, ((ids[0], -1.0), (ids[1], -2.0)))], top=1)
    assert entries[0].logprob == -1.0 and len(entries[0].top_logprobs) == 1
