"""Batch jobs: the OpenAI Batch file format, the resumable output file, `qwenkit batch` in-process and
against a server, and the server's /v1/files + /v1/batches driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from qwenkit.batch.format import BatchFileError, BatchLine, ResultFile, answered, parse_batch, refused
from qwenkit.batch.run import run_lines
from qwenkit.cli.app import app
from qwenkit.serve.config import ServeConfig
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import MODEL, FakeEngine, LiveServer, fake_app, in_process, live_server

runner = CliRunner()
KEY_A = "sk-batch-aaaaaaaaaaaaaaaa"
KEY_B = "sk-batch-bbbbbbbbbbbbbbbb"


def chat_line(custom_id: str, content: str = "Hi", max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **body,
    }
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(*items: dict[str, Any] | str) -> bytes:
    return "".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items).encode()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


# ---- the file format ---------------------------------------------------------------------------------------


def test_bad_lines_carry_their_error_with_the_line_number() -> None:
    data = jsonl(
        chat_line("ok"),
        "",  # blank lines are skipped, not numbered away
        "{not json",
        "[1, 2]",
        {"custom_id": "u", "method": "POST", "url": "/v1/images/generations", "body": {}},
        {"custom_id": "m", "method": "GET", "url": "/v1/completions", "body": {}},
        {"method": "POST", "url": "/v1/completions", "body": {}},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": "text"},
    )
    lines = parse_batch(data)
    assert [line.line for line in lines] == [1, 3, 4, 5, 6, 7, 8]
    assert lines[0].error is None and lines[0].custom_id == "ok" and lines[0].body["max_tokens"] == 8
    codes = [(line.line, line.error.code) for line in lines[1:] if line.error]
    assert codes == [
        (3, "invalid_json"),
        (4, "invalid_line"),
        (5, "unsupported_url"),
        (6, "invalid_method"),
        (7, "invalid_custom_id"),
        (8, "invalid_body"),
    ]
    assert all(line.error.message.startswith(f"line {line.line}:") for line in lines[1:] if line.error)
    # A batch with an endpoint: another url is that line's error.
    (other,) = parse_batch(jsonl(chat_line("x")), endpoint="/v1/completions")
    assert other.error is not None and other.error.code == "mismatched_url"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\xff\xfe garbage", "not UTF-8"),
        (b"hello\nworld\n", "not JSONL"),
        (b"\n\n", "not JSONL"),
        (jsonl(chat_line("a"), chat_line("b"), chat_line("a")), "lines 1 and 3"),
    ],
)
def test_a_file_that_cannot_run_is_refused_up_front(data: bytes, words: str) -> None:
    with pytest.raises(BatchFileError, match=words):
        parse_batch(data)


def test_too_many_requests_are_refused() -> None:
    with pytest.raises(BatchFileError, match="more than 2 requests"):
        parse_batch(jsonl(chat_line("a"), chat_line("b"), chat_line("c")), max_lines=2)
    assert len(parse_batch(jsonl(chat_line("a"), chat_line("b")), max_lines=2)) == 2


def test_output_lines_have_openais_shape() -> None:
    line = BatchLine(4, "c", "/v1/completions", {})
    ok = answered(line, 200, {"usage": {}}, "req-1")
    assert ok["id"].startswith("batch_req_") and ok["error"] is None
    assert ok["response"] == {"status_code": 200, "request_id": "req-1", "body": {"usage": {}}}
    err_body = {"error": {"message": "bad", "type": "invalid_request_error", "code": None}}
    bad = answered(line, 400, err_body, "req-2")
    assert bad["response"]["status_code"] == 400
    assert bad["error"] == {"code": "invalid_request_error", "message": "bad"}
    from qwenkit.batch.format import LineError

    no = refused(BatchLine(9, None, "", {}, LineError("invalid_json", "line 9: not JSON")))
    assert no["response"] is None and no["error"]["line"] == 9 and no["custom_id"] is None


# ---- the resumable output file -----------------------------------------------------------------------------


def test_result_file_resumes_and_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    lines = parse_batch(jsonl(chat_line("a"), chat_line("b"), "oops", chat_line("c")))
    with ResultFile(path) as out:
        assert out.open().records == 0
        out.append(answered(lines[0], 200, {}, "r"))
        out.append(refused(lines[2]))
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id": "batch_req_x", "custom_id": "b", "resp')  # a crash mid-write
    with ResultFile(path) as out:
        done = out.open()
        assert done.torn and done.records == 2
        assert [done.has(line) for line in lines] == [True, False, True, False]
        out.append(answered(lines[1], 200, {}, "r"))
    got = records(path)
    assert [r["custom_id"] for r in got] == ["a", None, "b"]  # the torn piece is gone, every line whole
    assert path.read_bytes().startswith(whole)


def test_result_file_refuses_a_file_that_is_not_batch_output(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"hello": 1}\n{"custom_id": "a", "response": null, "error": null}\n')
    with pytest.raises(BatchFileError, match="line 1 is not a batch output line"), ResultFile(path) as out:
        out.open()


def test_a_failed_write_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.jsonl"
    (line,) = parse_batch(jsonl(chat_line("a")))
    with ResultFile(path) as out:
        out.open()
        out.append(answered(line, 200, {"x": 1}, "r"))
        before = path.read_bytes()
        real_write = os.write
        calls = []

        def half_then_fail(fd: int, data: Any) -> int:
            calls.append(1)
            if len(calls) == 1:
                return real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", half_then_fail)
        with pytest.raises(OSError, match="No space"):
            out.append(answered(line, 200, {"x": 2}, "r"))
        monkeypatch.undo()
    assert path.read_bytes() == before


# ---- running lines -----------------------------------------------------------------------------------------


def test_run_lines_keeps_the_cap_full_and_runs_each_line_once() -> None:
    lines = parse_batch(jsonl(*(chat_line(str(i)) for i in range(20)), "bad"))
    in_flight, most, seen = 0, 0, []

    async def execute(line: BatchLine) -> dict[str, Any]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001 * (int(line.custom_id or 0) % 3))
        in_flight -= 1
        seen.append(line.custom_id)
        return answered(line, 200, {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}, "r")

    out: list[dict[str, Any]] = []
    progress = asyncio.run(run_lines(lines, execute, out.append, 4))
    assert most == 4  # several in flight (what the scheduler batches), never more than the cap
    assert sorted(seen, key=int) == [str(i) for i in range(20)]
    assert len(out) == 21 and progress.succeeded == 20 and progress.failed == 1
    assert progress.completion_tokens == 40 and progress.prompt_tokens == 60


# ---- `qwenkit batch` ---------------------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stderr


ENGINE = ("--threads", "2", "--max-seqs", "4", "--ctx", "512", "--poll", "0")


def test_batch_in_process_resumes_and_reruns_a_torn_line(
    demo_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(
        jsonl(
            chat_line("chat", seed=1),
            {"custom_id": "text", "method": "POST", "url": "/v1/completions",
             "body": {"model": "gpt-4o-mini", "prompt": "Once", "max_tokens": 5}},
            "not json",
            chat_line("stream", stream=True),
            chat_line("empty", messages=[]),
            {"custom_id": "resp", "method": "POST", "url": "/v1/responses",
             "body": {"input": "Hi", "max_output_tokens": 4}},
        )
    )  # fmt: skip
    code, err = invoke("batch", str(src), str(out), "--model", str(demo_gguf()), *ENGINE)
    assert code == 0, err
    got = {r["custom_id"]: r for r in records(out)}
    assert len(records(out)) == 6
    for ok in ("chat", "text", "resp"):  # every line runs on --model, whatever model it names
        assert got[ok]["response"]["status_code"] == 200 and got[ok]["error"] is None
    assert got["chat"]["response"]["body"]["object"] == "chat.completion"
    assert got["text"]["response"]["body"]["usage"]["completion_tokens"] <= 5
    assert got[None]["error"]["line"] == 3 and got[None]["response"] is None
    assert got["stream"]["response"]["status_code"] == 400 and "stream" in got["stream"]["error"]["message"]
    assert got["empty"]["response"]["status_code"] == 400
    assert "6 requests" in err and "3 ok, 3 failed" in err

    # A rerun skips what is done; a torn last line (a crash mid-write) is dropped and its request runs again.
    whole = out.read_bytes()
    code, err = invoke("batch", str(src), str(out), "--model", str(demo_gguf()), *ENGINE)
    assert code == 0 and "already in" in err and out.read_bytes() == whole
    kept = whole.splitlines(keepends=True)
    out.write_bytes(b"".join(kept[:-1]) + kept[-1][:20])
    code, err = invoke("batch", str(src), str(out), "--model", str(demo_gguf()), *ENGINE)
    assert code == 0, err
    assert "torn" in err and "resuming: 5 of 6" in err
    again = records(out)
    assert len(again) == 6 and {r["custom_id"] for r in again} == set(got)


def test_batch_refuses_bad_files_and_flags(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(jsonl(chat_line("a"), chat_line("a")))
    code, err = invoke("batch", str(src), str(out))
    assert code == 2 and "lines 1 and 2" in err and "Traceback" not in err and not out.exists()
    src.write_text("just some text\n")
    code, err = invoke("batch", str(src), str(out))
    assert code == 2 and "not JSONL" in err
    code, err = invoke("batch", str(src), str(out), "--base-url", "http://127.0.0.1:1", "--max-seqs", "4")
    assert code == 2 and "--max-seqs" in err
    code, err = invoke("batch", str(src), str(src))
    assert code == 2 and "another file" in err


@pytest.fixture(scope="module")
def keyed_server(
    demo_gguf: Callable[..., Path],
    demo_checkpoint: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    config = ServeConfig(
        api_keys=(SecretStr(KEY_A), SecretStr(KEY_B)),
        batch_dir=str(tmp_path_factory.mktemp("batches")),
        max_batch_file_bytes=64 * 1024,
        batch_storage_bytes=160 * 1024,
        batch_concurrency=2,
    )
    with live_server(demo_gguf(), demo_checkpoint(), config, n_ctx=512, max_seqs=4) as server:
        yield server


def test_batch_against_a_server_matches_in_process(
    keyed_server: LiveServer, demo_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    src = tmp_path / "in.jsonl"
    body = {"temperature": 0, "seed": 7}
    src.write_bytes(jsonl(chat_line("a", "Tell me", 12, **body), chat_line("b", "Other", 6, model="nope")))
    remote, local = tmp_path / "remote.jsonl", tmp_path / "local.jsonl"
    base = keyed_server.base_url + "/v1"
    code, err = invoke("batch", str(src), str(remote), "--base-url", base, "--api-key", "sk-wrong-key-123")
    assert code == 2 and "API key" in err and remote.read_bytes() == b""  # nothing recorded for a wrong key
    code, err = invoke("batch", str(src), str(remote), "--base-url", base, "--api-key", KEY_A)
    assert code == 0, err
    code, err = invoke("batch", str(src), str(local), "--model", str(demo_gguf()), *ENGINE)
    assert code == 0, err
    by_remote = {r["custom_id"]: r for r in records(remote)}
    by_local = {r["custom_id"]: r for r in records(local)}
    assert by_remote["b"]["response"]["status_code"] == 404  # the server serves one model
    answer = [by["a"]["response"]["body"]["choices"][0]["message"]["content"] for by in (by_remote, by_local)]
    assert answer[0] == answer[1] and answer[0]  # the same native path, the same answer


def test_batch_stops_cleanly_when_the_server_is_unreachable(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(jsonl(chat_line("a")))
    code, err = invoke("batch", str(src), str(out), "--base-url", "http://127.0.0.1:9")
    assert code == 2 and "cannot reach" in err and "rerun to resume" in err and out.read_bytes() == b""


# ---- /v1/files + /v1/batches with the openai client --------------------------------------------------------


def client(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def wait_for(c: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = c.batches.retrieve(batch_id)
        if batch.status in statuses or time.monotonic() > deadline:
            return batch
        time.sleep(0.1)


def test_openai_client_runs_a_batch_and_keys_are_isolated(keyed_server: LiveServer, tmp_path: Path) -> None:
    a, b = client(keyed_server, KEY_A), client(keyed_server, KEY_B)
    data = jsonl(
        chat_line("one"),
        chat_line("two", max_tokens=4),
        "{broken",
        {
            "custom_id": "three",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "x"},
        },
    )
    upload = a.files.create(file=("in.jsonl", data), purpose="batch")
    assert upload.bytes == len(data) and upload.purpose == "batch" and upload.filename == "in.jsonl"
    assert a.files.content(upload.id).read() == data
    batch = a.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": "v"}
    )
    assert batch.request_counts is not None and batch.request_counts.total == 4
    # Another key sees none of it.
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(upload.id)
    with pytest.raises(openai.NotFoundError):
        b.files.content(upload.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.cancel(batch.id)
    assert b.batches.list().data == [] and b.files.list().data == []
    done = wait_for(a, batch.id, ("completed", "failed"))
    assert done.status == "completed" and done.metadata == {"k": "v"}
    assert done.request_counts.completed == 2 and done.request_counts.failed == 2
    assert done.usage is not None and done.usage.output_tokens > 0
    ok = [json.loads(x) for x in a.files.content(done.output_file_id).text.splitlines()]
    bad = [json.loads(x) for x in a.files.content(done.error_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in ok) == ["one", "two"]
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in ok)
    assert {(r["custom_id"], r["error"]["code"]) for r in bad} == {
        (None, "invalid_json"),
        ("three", "mismatched_url"),
    }
    assert a.batches.list().data[0].id == batch.id
    assert a.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(upload.id)
    metrics = httpx.get(keyed_server.base_url + "/metrics", headers={"Authorization": f"Bearer {KEY_A}"}).text
    assert 'route="/v1/batches/{id}"' in metrics and 'route="/v1/files"' in metrics  # ids never become labels


def test_batch_api_refuses_what_it_cannot_run(keyed_server: LiveServer) -> None:
    a = client(keyed_server, KEY_A)
    dup = a.files.create(file=("dup.jsonl", jsonl(chat_line("x"), chat_line("x"))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="lines 1 and 2"):
        a.batches.create(input_file_id=dup.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        a.batches.create(input_file_id=dup.id, endpoint="/v1/moderations", completion_window="24h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        a.batches.create(
            input_file_id="file-" + "0" * 24, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match="purpose"):
        a.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    # Size caps: one file (before and after the body is read), and all of one key's files together.
    with pytest.raises(openai.APIStatusError, match="--batch-file-mb") as big:
        a.files.create(file=("big.jsonl", b"x" * (70 * 1024)), purpose="batch")
    assert big.value.status_code == 413
    with pytest.raises(openai.APIStatusError, match="--batch-file-mb") as big:
        a.files.create(file=("big.jsonl", b"x" * (64 * 1024 + 1)), purpose="batch")
    assert big.value.status_code == 413
    kept = [a.files.create(file=("f.jsonl", b"y" * (60 * 1024)), purpose="batch") for _ in range(2)]
    with pytest.raises(openai.APIStatusError, match="--batch-storage-mb") as full:
        a.files.create(file=("f.jsonl", b"y" * (60 * 1024)), purpose="batch")
    assert full.value.status_code == 413
    for f in [*kept, dup]:
        a.files.delete(f.id)


def test_cancel_stops_a_running_batch(keyed_server: LiveServer) -> None:
    a = client(keyed_server, KEY_A)
    lines = [chat_line(f"c{i}", max_tokens=64, ignore_eos=True) for i in range(24)]
    upload = a.files.create(file=("many.jsonl", jsonl(*lines)), purpose="batch")
    batch = a.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelling = a.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(a, batch.id, ("cancelled",))
    assert done.status == "cancelled" and done.request_counts.completed < 24
    a.files.delete(upload.id)
    # A finished batch cannot be cancelled.
    upload = a.files.create(file=("one.jsonl", jsonl(chat_line("z", max_tokens=2))), purpose="batch")
    batch = a.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_for(a, batch.id, ("completed",)).status == "completed"
    with pytest.raises(openai.ConflictError, match="completed"):
        a.batches.cancel(batch.id)
    a.files.delete(upload.id)


def test_a_batch_cut_off_by_a_shutdown_resumes_on_the_next_start(
    demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    config = ServeConfig(batch_dir=str(tmp_path), batch_concurrency=1)
    lines = [chat_line(f"r{i}", max_tokens=24, ignore_eos=True) for i in range(12)]
    with live_server(demo_gguf(), demo_checkpoint(), config, n_ctx=512, max_seqs=2) as server:
        c = client(server, "unused")
        upload = c.files.create(file=("r.jsonl", jsonl(*lines)), purpose="batch")
        batch = c.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 60
        while c.batches.retrieve(batch.id).request_counts.completed < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    # The shutdown stopped it part-way, without failing a request.
    stored = json.loads((tmp_path / "open" / "batches" / f"{batch.id}.json").read_text())
    assert stored["status"] == "in_progress" and 2 <= stored["request_counts"]["completed"] < 12
    assert stored["request_counts"]["failed"] == 0
    with live_server(demo_gguf(), demo_checkpoint(), config, n_ctx=512, max_seqs=2) as server:
        c = client(server, "unused")
        done = wait_for(c, batch.id, ("completed", "failed"))
        assert done.status == "completed" and done.request_counts.completed == 12
        out = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
        assert sorted(r["custom_id"] for r in out) == sorted(f"r{i}" for i in range(12))  # each exactly once
        assert all(r["response"]["body"]["choices"][0]["finish_reason"] == "length" for r in out)


def test_files_and_batches_answer_bad_requests_with_4xx(
    demo_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    tokenizer = QwenTokenizer.from_dir(demo_checkpoint())
    config = ServeConfig(batch_dir=str(tmp_path))
    with in_process(fake_app(FakeEngine(tokenizer), config)) as http:
        assert http.post("/v1/files", json={"purpose": "batch"}).status_code == 415
        no_file = http.post("/v1/files", data={"purpose": "batch"}, files={"other": ("a", b"x")})
        assert no_file.status_code == 400 and "'file'" in no_file.json()["error"]["message"]
        broken = http.post(
            "/v1/files",
            content=b"--xx\r\nnonsense",
            headers={"content-type": "multipart/form-data; boundary=xx"},
        )
        assert broken.status_code == 400
        assert http.get("/v1/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
        assert http.get("/v1/files/file-zzz/content").status_code == 404
        assert http.delete("/v1/files/file-" + "a" * 24).status_code == 404
        assert http.get("/v1/batches/batch_nope").status_code == 404
        assert http.get("/v1/batches?limit=abc").status_code == 400
        assert http.get("/v1/files?limit=0").status_code == 400
        assert (
            http.post("/v1/batches", content=b"[]", headers={"content-type": "application/json"}).status_code
            == 400
        )
        assert (
            http.post("/v1/batches", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        )
        upload = http.post(
            "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", jsonl(chat_line("a")))}
        )
        assert upload.status_code == 200
        file_id = upload.json()["id"]
        bad = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
        assert http.post("/v1/batches", json={**bad, "completion_window": "1h"}).status_code == 400
        many = {str(i): "v" for i in range(17)}
        create = {**bad, "completion_window": "24h", "metadata": many}
        assert http.post("/v1/batches", json=create).status_code == 400
        listed = http.get("/v1/files", params={"limit": 1}).json()
        assert listed["data"][0]["id"] == file_id and listed["has_more"] is False


def test_in_process_engine_takes_all_lines_in_flight(demo_gguf: Callable[..., Path]) -> None:
    """The runner keeps twice --max-seqs lines in flight; the engine's queue takes them all (a refusal would
    be waited out and retried: slow, and a second engine request for the line)."""
    from qwenkit.cli.batch import native_engine

    lines = parse_batch(jsonl(*(chat_line(f"n{i}", max_tokens=6) for i in range(12))))

    async def go() -> tuple[int, list[dict[str, Any]]]:
        async with native_engine(str(demo_gguf()), 4, 256, 2, "0", "q8_0", False) as run:
            engine = run.execute.ctx.engine
            # All in flight may be submitted before the engine's loop takes any: its queue must hold them.
            assert engine.config.max_waiting >= run.in_flight == 8
            submitted = []
            real = engine.generate

            def counting(request: Any) -> Any:
                submitted.append(request.request_id)
                return real(request)

            engine.generate = counting  # type: ignore[method-assign]
            out: list[dict[str, Any]] = []
            progress = await run_lines(lines, run.execute, out.append, run.in_flight)
            assert progress.ended is not None
            return len(submitted), out

    submitted, out = asyncio.run(go())
    assert submitted == 12 and all(r["response"]["status_code"] == 200 for r in out)
