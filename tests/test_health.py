"""Health with advice: the rules on given measurements (each names its flag or command), and
/health?verbose=1 and `qwenkit doctor --server` on the real server with the tiny demo engine (checks measured
from live traffic, the key when keys are set, one-line errors).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from qwenkit.cli import plan as plan_cli
from qwenkit.serve.config import ServeConfig
from qwenkit.serve.health import Check, Facts, Observed, advise, overall
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import API_KEY, MODEL, FakeEngine, LiveServer, fake_app, in_process, live_server

GIB = 1024**3
FACTS = Facts(model="m.gguf", threads=4, physical_cores=4, max_seqs=8, n_ctx=32768, state_cache_mb=1024)
HEALTHY = Observed(
    window_s=60,
    decode_tok_s=40.0,
    expected_tok_s=50.0,
    expected_basis="estimate",
    batch=1.0,
    running=1,
    waiting=0,
    ttft_mean_s=0.2,
    kv_used=1000,
    kv_total=32768,
    memory_total=16 * GIB,
    memory_available=8 * GIB,
    swap_used=0,
    load_avg=1.0,
    cpus=4,
    finished=10,
    truncated=0,
)


def check(name: str, observed: Observed, facts: Facts = FACTS) -> Check:
    return next(c for c in advise(observed, facts) if c.name == name)


def test_healthy_server_has_no_advice() -> None:
    checks = advise(HEALTHY, FACTS)
    assert [c.status for c in checks] == ["ok"] * len(checks)
    assert all(c.advice == "" for c in checks)
    assert overall(checks) == "ok"


@pytest.mark.parametrize(
    ("facts", "observed", "cause"),
    [
        (replace(FACTS, threads=2), HEALTHY, "--threads 4"),
        (replace(FACTS, threads=8), HEALTHY, "--threads 4"),
        (FACTS, replace(HEALTHY, load_avg=7.5), "another process"),
        (FACTS, replace(HEALTHY, swap_used=GIB, memory_available=GIB), "swap"),
        (FACTS, HEALTHY, "qwenkit bench"),
    ],
)
def test_slow_decode_names_the_likely_cause(facts: Facts, observed: Observed, cause: str) -> None:
    slow = replace(observed, decode_tok_s=20.0)  # 40% of the estimate
    c = check("decode speed", slow, facts)
    assert c.status == "warn"
    assert cause in c.advice
    assert "40%" in c.detail
    assert check("decode speed", replace(observed, decode_tok_s=26.0), facts).status == "ok"


def test_decode_without_tokens_or_a_binding_estimate_is_unknown() -> None:
    assert check("decode speed", replace(HEALTHY, decode_tok_s=None)).status == "unknown"
    assert check("decode speed", replace(HEALTHY, expected_tok_s=None)).status == "unknown"
    # A tiny model's bandwidth estimate is far above what fixed per-step costs allow: not a verdict.
    tiny = check("decode speed", replace(HEALTHY, expected_tok_s=400.0, decode_tok_s=30.0))
    assert tiny.status == "unknown" and tiny.advice == ""


@pytest.mark.parametrize(("available", "status"), [(0.5, "ok"), (0.10, "warn"), (0.03, "fail")])
def test_memory_headroom(available: float, status: str) -> None:
    c = check("memory", replace(HEALTHY, memory_available=int(16 * GIB * available)))
    assert c.status == status
    if status != "ok":
        assert "qwenkit plan m.gguf --concurrency 8 --ctx 4096" in c.advice
        assert "--quant" in c.advice


def test_queue_advice_depends_on_kv_room() -> None:
    queued = replace(HEALTHY, waiting=5, ttft_mean_s=4.0)
    room = check("queue", queued)
    assert room.status == "warn"
    assert "--max-seqs (now 8) to 16 and --ctx to 65536" in room.advice
    full = check("queue", replace(queued, kv_used=32000))
    assert "second replica" in full.advice
    assert "--max-seqs (now 8)" not in full.advice
    # A slow first token with nothing waiting still counts as queueing.
    assert check("queue", replace(HEALTHY, ttft_mean_s=3.0)).status == "warn"


def test_kv_pressure_and_preemptions() -> None:
    assert check("KV cache", replace(HEALTHY, kv_used=31000)).status == "warn"
    preempted = check("KV cache", replace(HEALTHY, preemptions=3))
    assert preempted.status == "warn"
    assert "--ctx (now 32768)" in preempted.advice
    assert "--max-seqs (now 8)" in preempted.advice


def test_state_cache_evictions() -> None:
    c = check("state cache", replace(HEALTHY, state_cache_evictions=2, state_cache_bytes=900 * 1024**2))
    assert c.status == "warn"
    assert "--state-cache-mb (now 1024) to 2048" in c.advice
    assert check("state cache", HEALTHY, replace(FACTS, state_cache_mb=0)).value.startswith("off")


def test_thinking_truncation_rate() -> None:
    c = check("truncated answers", replace(HEALTHY, finished=10, truncated=3))
    assert c.status == "warn"
    assert "thinking_budget" in c.advice
    assert "4096 tokens" in c.advice  # the room per request: --ctx / --max-seqs
    assert check("truncated answers", replace(HEALTHY, finished=4, truncated=3)).status == "ok"  # too few
    assert check("truncated answers", replace(HEALTHY, finished=0)).status == "unknown"


def test_overall_is_the_worst_check() -> None:
    checks = advise(replace(HEALTHY, memory_available=GIB // 10, preemptions=1), FACTS)
    assert overall(checks) == "fail"
    assert overall(advise(replace(HEALTHY, preemptions=1), FACTS)) == "warn"


# ---- served ---------------------------------------------------------------------------------------------
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def live(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[LiveServer]:
    config = ServeConfig(api_keys=(API_KEY,))  # type: ignore[arg-type]
    gguf, checkpoint = demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny")
    with live_server(gguf, checkpoint, config, n_ctx=1024, max_seqs=2) as server:
        yield server


def test_verbose_health_measures_live_traffic(live: LiveServer) -> None:
    with httpx.Client(base_url=live.base_url, timeout=120) as client:
        assert client.get("/health?verbose=1", headers=AUTH).json()["checks"][0]["status"] == "unknown"
        for _ in range(2):  # cut by max_tokens: both count as truncated
            r = client.post(
                "/v1/chat/completions",
                headers=AUTH,
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"
        body = client.get("/health?verbose=1", headers=AUTH).json()
    assert body["status"] == "ok"
    assert body["verdict"] in ("ok", "warn", "fail")
    checks = {c["name"]: c for c in body["checks"]}
    assert set(checks) == {"decode speed", "memory", "queue", "KV cache", "state cache", "truncated answers"}
    assert body["measured"]["decode_tok_s"] > 0
    assert body["measured"]["finished"] == 2
    assert checks["truncated answers"]["value"].startswith("2 of 2")
    assert body["settings"]["max_seqs"] == live.engine.config.max_seqs == 2
    assert body["settings"]["n_ctx"] == live.engine.config.n_ctx
    assert body["measured"]["memory_total"] > 0
    # The planner reads the served GGUF: an estimate to compare against, with its basis.
    assert body["measured"]["expected_tok_s"] > 0, body["measured"]["expected_basis"]


def test_verbose_health_needs_the_key_when_keys_are_set(live: LiveServer) -> None:
    with httpx.Client(base_url=live.base_url, timeout=60) as client:
        plain = client.get("/health")
        assert plain.status_code == 200
        assert "checks" not in plain.json() and "model" not in plain.json()
        refused = client.get("/health?verbose=1")
        assert refused.status_code == 401
        assert "Authorization" in refused.json()["error"]["message"]
        wrong = {"Authorization": "Bearer wrong-key-123"}
        assert client.get("/health?verbose=1", headers=wrong).status_code == 401
        assert client.get("/health?verbose=0").status_code == 200


def _doctor(*args: str) -> Any:
    app = typer.Typer()
    app.command("doctor")(plan_cli.doctor_command)
    app.command("other")(lambda: None)  # two commands: typer keeps "doctor" a subcommand
    return CliRunner().invoke(app, ["doctor", *args], env={"QWENKIT_API_KEY": ""}, terminal_width=200)


def test_doctor_server_prints_the_checks(live: LiveServer) -> None:
    table = _doctor("--server", live.base_url + "/v1", "--api-key", API_KEY)
    assert table.exit_code == 0, table.output
    for name in ("decode speed", "memory", "queue", "KV cache", "state cache", "truncated answers"):
        assert name in table.output
    as_json = _doctor("--server", live.base_url, "--api-key", API_KEY, "--json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["settings"]["max_seqs"] == 2


def test_doctor_server_errors_name_the_fix(live: LiveServer) -> None:
    no_key = _doctor("--server", live.base_url)
    assert no_key.exit_code != 0
    assert "--api-key" in no_key.output
    assert "Traceback" not in no_key.output
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = _doctor("--server", f"http://127.0.0.1:{port}")
    assert down.exit_code != 0
    assert "cannot reach" in down.output
    assert "not a URL" in _doctor("--server", "localhost:8000").output


def test_wrong_keys_on_verbose_health_meet_the_lockout(demo_checkpoint: Callable[..., Path]) -> None:
    engine = FakeEngine(QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny")))
    config = ServeConfig(api_keys=(API_KEY,), auth_failures_per_minute=2)  # type: ignore[arg-type]
    wrong = {"Authorization": "Bearer wrong-key-123"}
    with in_process(fake_app(engine, config)) as client:
        assert [client.get("/health?verbose=1", headers=wrong).status_code for _ in range(3)] == [
            401,
            401,
            429,
        ]
        assert client.get("/v1/models", headers=wrong).status_code == 429  # one allowance for every path
        # A valid key is never locked out; with a non-llama.cpp engine the settings are simply unknown.
        body = client.get("/health?verbose=1", headers=AUTH).json()
        assert body["settings"]["max_seqs"] is None
        assert body["checks"][0]["status"] == "unknown"
