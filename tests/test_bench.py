"""`qwenkit bench`: the metrics arithmetic on hand-made timings; the load generator against a real `qwenkit
serve` (tiny demo model) in closed-loop, Poisson and --compare modes, through the API and the CLI; failures
counted from a fake raw-socket server that answers 500 or drops mid-stream; the one-line errors."""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from qwenkit.bench import BenchConfig, BenchError, BenchReport, run_bench, write_report
from qwenkit.bench.client import Endpoint, RequestRecord, sse_events
from qwenkit.bench.metrics import is_good, itl, mean_itl, percentiles, summarize, ttft
from qwenkit.bench.report import PLOTS_HINT
from qwenkit.bench.run import arrival_offsets, endpoint_labels
from qwenkit.cli.app import app
from serve_fixtures import MODEL, LiveServer, live_server

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def record(sent: float, chunks: list[float], end: float, usage: int | None = None, error: str | None = None):
    return RequestRecord(sent=sent, end=end, chunk_times=chunks, usage_completion=usage, error=error)


# --- arithmetic on hand-made timings -------------------------------------------------------------------


def test_percentiles_by_hand() -> None:
    got = percentiles([4.0, 1.0, 3.0, 2.0])
    assert got["p50"] == pytest.approx(2.5)
    assert got["p90"] == pytest.approx(3.7)  # linear: 1 + 0.9 * 3
    assert got["p99"] == pytest.approx(3.97)
    assert got["mean"] == pytest.approx(2.5)
    assert got["max"] == 4.0
    assert set(percentiles([]).values()) == {None}


def test_ttft_itl_and_goodput_by_hand() -> None:
    fast = record(10.0, [10.1, 10.3, 10.6], 10.7, usage=3)
    assert ttft(fast) == pytest.approx(0.1)
    assert itl(fast) == pytest.approx([0.2, 0.3])
    assert mean_itl(fast) == pytest.approx(0.25)
    slow_first = record(0.0, [2.0, 2.1], 2.2, usage=2)
    slow_gaps = record(0.0, [0.1, 1.1, 2.1], 2.2, usage=3)
    failed = record(0.0, [0.1], 0.5, error="HTTP 500")
    dropped = record(0.0, [0.1, 0.2], 0.3, error="disconnected")
    assert is_good(fast, slo_ttft=0.5, slo_itl=0.5)
    assert not is_good(slow_first, slo_ttft=0.5, slo_itl=0.5)
    assert not is_good(slow_gaps, slo_ttft=0.5, slo_itl=0.5)
    assert is_good(slow_gaps, slo_ttft=0.5, slo_itl=None)  # an SLO not given holds
    assert not is_good(failed, None, None)

    records = [fast, slow_first, slow_gaps, failed, dropped]
    s = summarize(records, wall_s=4.0, cpu_s=0.2, slo_ttft=0.5, slo_itl=0.5)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 3, 2)
    assert s["failures"] == {"HTTP 500": 1, "disconnected": 1}
    assert s["output_tokens"] == 8 and s["tokens_source"] == "usage"
    assert s["output_tok_s"] == pytest.approx(2.0)
    assert s["request_throughput"] == pytest.approx(0.75)
    assert s["goodput"] == pytest.approx(0.25) and s["goodput_fraction"] == pytest.approx(0.2)
    assert s["client_cpu_share"] == pytest.approx(0.05)
    assert s["ttft"]["max"] == pytest.approx(2.0)  # completed requests only
    assert s["itl"]["max"] == pytest.approx(1.0) and s["itl"]["p50"] == pytest.approx(0.3)
    # Without usage the chunks are the tokens.
    no_usage = summarize([record(0.0, [0.1, 0.2], 0.3)], wall_s=1.0, cpu_s=0.0)
    assert no_usage["output_tokens"] == 2 and no_usage["tokens_source"] == "chunks"
    assert no_usage["no_content"] == 0
    # A stream whose text the server held back: TTFT at its first chunk, counted in no_content.
    silent = RequestRecord(sent=1.0, end=2.0, first_event=1.25, usage_completion=5)
    assert ttft(silent) == pytest.approx(0.25) and itl(silent) == []
    s = summarize([silent], wall_s=1.0, cpu_s=0.0)
    assert s["no_content"] == 1 and s["ttft"]["p50"] == pytest.approx(0.25) and s["output_tokens"] == 5


# --- a real qwenkit serve ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[LiveServer]:
    with live_server(demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny"), n_ctx=1024) as live:
        yield live


def test_closed_loop_against_qwenkit_serve(server: LiveServer) -> None:
    calls: list[tuple[int, int]] = []
    config = BenchConfig(
        base_url=server.base_url, concurrency=[1, 3], num_requests=4, input_len=64, output_len=8, warmup=1
    )
    report = run_bench(config, progress=lambda done, total: calls.append((done, total)))
    assert report.endpoints[0].model == MODEL  # the first id of /v1/models
    assert calls[-1] == (1 + 2 * 4, 1 + 2 * 4)  # warm-up + every measured request
    assert [lv.concurrency for lv in report.levels] == [1, 3]
    for lv in report.levels:
        assert (lv.requests, lv.completed, lv.failed, lv.failures) == (4, 4, 0, {})
        assert lv.tokens_source == "usage"
        assert [s.tokens for s in lv.samples] == [8] * 4  # ignore_eos: exactly output_len each
        assert lv.output_tokens == 32
        assert all(0 < s.chunks <= s.tokens for s in lv.samples) and lv.no_content == 0
        assert all(s.ttft_s is not None and 0 < s.ttft_s <= s.e2e_s for s in lv.samples)
        middle = sorted(s.ttft_s or 0.0 for s in lv.samples)[1:3]
        assert lv.ttft["p50"] == pytest.approx(sum(middle) / 2)
        assert lv.ttft["max"] == pytest.approx(max(s.ttft_s for s in lv.samples))
        assert lv.e2e["max"] == pytest.approx(max(s.e2e_s for s in lv.samples))
        assert lv.output_tok_s == pytest.approx(lv.output_tokens / lv.wall_s)
        assert lv.request_throughput == pytest.approx(4 / lv.wall_s)
        assert lv.goodput == pytest.approx(lv.request_throughput)  # no SLO given: every completed one is good
        assert lv.client_cpu_share >= 0
        assert 0.8 * 64 <= lv.prompt_tokens_mean <= 1.5 * 64  # prompts of ~input_len tokens
    assert report.level(concurrency=3) is report.levels[1]


def test_sse_events_as_the_benchmarks_use_it(server: LiveServer) -> None:
    payload = {"model": MODEL, "prompt": "alpha beta", "max_tokens": 4, "ignore_eos": True, "stream": True}
    payload["stream_options"] = {"include_usage": True}

    async def collect() -> list[dict[str, Any]]:
        return [
            event
            async for event in sse_events(Endpoint.parse(server.base_url).port, "/v1/completions", payload)
        ]

    events = asyncio.run(collect())
    assert any(c.get("text") for e in events for c in e["choices"])
    assert events[-1]["usage"]["completion_tokens"] == 4


def test_poisson_arrivals(server: LiveServer) -> None:
    config = BenchConfig(
        base_url=server.base_url, request_rate=[20.0], num_requests=4, output_len=8, warmup=0
    )
    report = run_bench(config)
    (lv,) = report.levels
    assert (lv.concurrency, lv.request_rate) == (None, 20.0)
    assert (lv.completed, lv.output_tokens) == (4, 32)


def test_cli_compare_two_labels_writes_json_png_html(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["bench", "--base-url", server.base_url + "/v1", "--compare", server.base_url]
    args += ["--label", "first", "--label", "second", "--endpoint", "chat", "--concurrency", "1,2"]
    args += [
        "--num-requests",
        "2",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--rounds",
        "2",
        "--warmup",
        "1",
    ]
    args += ["--slo-ttft", "1000", "--slo-itl", "1000", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "first" in result.output and "second" in result.output
    data = json.loads((out / "results.json").read_text())
    report = BenchReport.model_validate(data)
    assert "api_key" not in data["config"]
    assert [e.label for e in report.endpoints] == ["first", "second"]
    assert [(lv.endpoint, lv.concurrency) for lv in report.levels] == [
        ("first", 1),
        ("second", 1),
        ("first", 2),
        ("second", 2),
    ]
    for lv in report.levels:
        assert (lv.rounds, lv.requests, lv.completed) == (2, 4, 4)
        assert sorted({s.round for s in lv.samples}) == [0, 1]
        assert len(lv.output_tok_s_rounds) == 2
        assert lv.goodput_fraction == 1.0  # generous SLOs
    assert "goodput" in data["definitions"] and data["machine"]["logical_cpus"]
    for png in ("throughput.png", "latency.png"):
        assert (out / png).read_bytes().startswith(PNG)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "first" in page and "goodput" in page
    assert not list(out.glob(".*"))  # no temporary files left behind


# --- a fake server for failures ------------------------------------------------------------------------


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"


@dataclass
class Fake:
    """What the fake server saw and how it answers GET /v1/models."""

    url: str = ""
    models_status: int = 200
    plain_json: bool = False  # answer POSTs with a whole JSON body, as a server that does not stream
    heads: list[str] = field(default_factory=list)
    posts: int = 0
    post_times: list[float] = field(default_factory=list)


async def _fake_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fake: Fake) -> None:
    """GET /v1/models lists "fake" (or answers fake.models_status); POSTs in turn: HTTP 500, a chunked
    stream cut after two chunks, a whole stream (not chunked, CRLF-separated events) with usage."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    fake.heads.append(head)
    length = next(
        (int(line.split(":")[1]) for line in head.split("\r\n") if line.lower().startswith("content-length")),
        0,
    )
    await reader.readexactly(length)
    if head.startswith("GET"):
        body = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
        status = b"200 OK" if fake.models_status == 200 else b"%d Nope" % fake.models_status
        writer.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, len(body))
            + body
        )
    else:
        n = fake.posts
        fake.posts += 1
        fake.post_times.append(time.monotonic())
        if fake.plain_json:
            n = -1
            body = b'{"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}]}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        text = {"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
        if n < 0:
            pass
        elif n % 3 == 0:
            body = b'{"error": {"message": "boom"}}'
            writer.write(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
        elif n % 3 == 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(2):
                event = _sse(text)
                writer.write(b"%x\r\n" % len(event) + event + b"\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            for _ in range(3):
                writer.write(_sse(text))
            writer.write(_sse({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
            writer.write(_sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}))
            writer.write(b"data: [DONE]\r\n\r\n")
    await writer.drain()
    writer.close()


@contextlib.contextmanager
def fake_server(models_status: int = 200, plain_json: bool = False) -> Iterator[Fake]:
    loop = asyncio.new_event_loop()
    fake = Fake(models_status=models_status, plain_json=plain_json)
    server = loop.run_until_complete(
        asyncio.start_server(lambda r, w: _fake_handler(r, w, fake), "127.0.0.1", 0)
    )
    fake.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        server.close()
        loop.close()


def test_failures_counted_and_run_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_server() as fake:
        config = BenchConfig(
            base_url=fake.url, api_key="sk-bench-key", concurrency=[1], num_requests=6, output_len=4, warmup=0
        )
        report = run_bench(config)
    assert len(fake.heads) == 7 and all("Authorization: Bearer sk-bench-key" in h for h in fake.heads)
    (lv,) = report.levels
    assert report.endpoints[0].model == "fake"
    assert (lv.requests, lv.completed, lv.failed) == (6, 2, 4)
    assert lv.failures == {"HTTP 500": 2, "disconnected": 2}
    assert lv.output_tokens == 8 and lv.tokens_source == "usage"  # the completed ones' usage
    assert [s.error for s in lv.samples] == ["HTTP 500", "disconnected", None] * 2
    assert [s.chunks for s in lv.samples if s.error is None] == [3, 3]
    assert "sk-bench-key" not in report.model_dump_json()

    # Without matplotlib: JSON and HTML still written, no PNG, a one-line hint.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    written, note = write_report(report, tmp_path)
    assert note == PLOTS_HINT
    assert sorted(p.name for p in written) == ["report.html", "results.json"]
    assert not list(tmp_path.glob("*.png"))
    assert html.escape(PLOTS_HINT) in (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["levels"][0]["failures"] == lv.failures


# --- errors --------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_one_line_exit_2(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    result = runner.invoke(app, ["bench", "--base-url", url, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"cannot reach {url}" in result.output and "is the server running?" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "results.json").exists()
    with pytest.raises(BenchError, match="cannot reach"):
        run_bench(BenchConfig(base_url=url))


@pytest.mark.parametrize("levels", ["1,x", "0", "4,4", ""])
def test_bad_concurrency_one_line(levels: str, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["bench", "--base-url", "http://127.0.0.1:1", "--concurrency", levels, "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "--concurrency must be distinct positive integers" in result.output
    assert "Traceback" not in result.output


def test_out_not_writable_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["bench", "--base-url", "http://127.0.0.1:1", "--out", str(blocker / "sub")])
    assert result.exit_code == 2
    assert "cannot write to" in result.output and "--out" in result.output


def test_bench_help() -> None:
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    for option in ("--base-url", "--concurrency", "--request-rate", "--compare", "--slo-ttft", "--out"):
        assert option in result.output


def test_every_warmup_failing_stops_before_measuring() -> None:
    with fake_server() as fake:  # the first two answers: HTTP 500 ("boom"), then a cut stream
        with pytest.raises(BenchError, match=r"every warm-up request to .* failed \(.*HTTP 500 x1.*boom"):
            run_bench(BenchConfig(base_url=fake.url, concurrency=[1], num_requests=4, warmup=2))
        assert fake.posts == 2


def test_models_401_names_the_api_key() -> None:
    with fake_server(models_status=401) as fake:
        with pytest.raises(BenchError, match="answered 401 to GET /v1/models: pass the server's --api-key"):
            run_bench(BenchConfig(base_url=fake.url, warmup=0))
        assert fake.posts == 0


def test_poisson_schedule() -> None:
    offsets = arrival_offsets(4000, 8.0, "s")
    assert offsets == arrival_offsets(4000, 8.0, "s") and offsets != arrival_offsets(4000, 8.0, "t")
    assert offsets[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(offsets))
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.1)  # exponential: mean = std = 1/rate
    assert gaps.std() == pytest.approx(1 / 8.0, rel=0.1)


def test_a_server_that_does_not_stream_is_a_bad_response() -> None:
    with fake_server(plain_json=True) as fake:
        report = run_bench(BenchConfig(base_url=fake.url, num_requests=2, warmup=0))
    assert report.levels[0].failures == {"bad response": 2}


def test_endpoint_urls() -> None:
    ep = Endpoint.parse("https://example.com/proxy/v1/", api_key="k")
    assert (ep.host, ep.port, ep.tls, ep.path("/v1/models")) == ("example.com", 443, True, "/proxy/v1/models")
    assert ep.headers() == {"Authorization": "Bearer k"}
    v6 = Endpoint.parse("http://[::1]:8000")
    assert (v6.netloc, v6.path("/v1/completions")) == ("[::1]:8000", "/v1/completions")
    for bad in ("127.0.0.1:8000", "ftp://host", "http://host:99999"):
        with pytest.raises(ValueError, match="base URL"):
            Endpoint.parse(bad)
    assert endpoint_labels(["http://a:1", "http://a:1", "http://b:2"], ["x", "x"]) == ["x", "x #2", "b:2"]


def test_compare_alternates_endpoints_within_each_level() -> None:
    with fake_server() as a, fake_server() as b:
        report = run_bench(
            BenchConfig(
                base_url=a.url,
                compare=[b.url],
                labels=["A", "B"],
                concurrency=[1, 2],
                num_requests=3,
                rounds=2,
                warmup=0,
            )
        )
    order = "".join(
        name for _, name in sorted([(t, "A") for t in a.post_times] + [(t, "B") for t in b.post_times])
    )
    assert order == ("AAABBB" * 2) * 2  # per level: round 1 A then B, round 2 A then B
    assert [(lv.endpoint, lv.concurrency, lv.requests) for lv in report.levels] == [
        ("A", 1, 6),
        ("B", 1, 6),
        ("A", 2, 6),
        ("B", 2, 6),
    ]


def test_more_labels_than_urls_one_line(tmp_path: Path) -> None:
    args = [
        "bench",
        "--base-url",
        "http://127.0.0.1:1",
        "--label",
        "a",
        "--label",
        "b",
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--label given 2 times for 1 URL(s)" in result.output
