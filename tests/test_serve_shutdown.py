"""`qwenkit serve` as a real process: it says where it listens, serves the demo model, and on SIGTERM stops
admitting, lets a short in-flight stream finish, aborts a long one after --shutdown-timeout, exits 0."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

KEY = "sk-shutdown-test-key-0001"
# The serve command run the way the `qwenkit` entry point runs it, without depending on its registration.
RUN_SERVE = "import typer; from qwenkit.cli.serve import serve_command; typer.run(serve_command)"


class Server:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def wait_for_url(self) -> str:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "".join(self.stderr)
                continue
            found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                return f"http://127.0.0.1:{found.group(1)}"
        raise AssertionError("no URL printed:\n" + "".join(self.stderr))


@pytest.fixture
def server() -> Iterator[Server]:
    env = {**os.environ, "QWENKIT_API_KEY": KEY}
    cmd = [
        sys.executable,
        "-c",
        RUN_SERVE,
        "--port",
        "0",
        "--shutdown-timeout",
        "8",
        "--max-seqs",
        "2",
        "--ctx",
        "65536",  # 32768 tokens per request: room for the long stream
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield Server(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stream_events(
    url: str, path: str, body: dict[str, Any], started: threading.Event, out: list[Any]
) -> None:
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
        model = http.get(url + "/v1/models").json()["data"][0]["id"]
        with http.stream("POST", url + path, json={**body, "model": model, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    out.append(data if data == "[DONE]" else json.loads(data))
                    if len(out) >= 3:
                        started.set()
    started.set()  # also when the request failed: the test then fails on what it got, without waiting


# Greedy decoding of the demo model loops on one word and never ends by itself: a reliably long stream.
LONG = {"prompt": "tell me a secret story", "max_tokens": 30_000, "temperature": 0}
SHORT = {
    "messages": [{"role": "user", "content": "tell me a secret story"}],
    "max_tokens": 12,
    "chat_template_kwargs": {"enable_thinking": False},
}


@pytest.mark.slow  # 11-15 s
def test_sigterm_drains_then_exits_zero(server: Server) -> None:
    url = server.wait_for_url()
    deadline = time.monotonic() + 120
    while True:  # the socket is bound before the model loads; wait for the app
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and server.proc.poll() is None, "".join(server.stderr)
        time.sleep(0.1)
    assert any("random" in line for line in server.stderr)  # the demo model says it is noise
    assert any("API key: on" in line for line in server.stderr)

    short: list[Any] = []
    long: list[Any] = []
    short_started, long_started = threading.Event(), threading.Event()
    threads = [
        threading.Thread(
            target=stream_events, args=(url, "/v1/completions", LONG, long_started, long), daemon=True
        ),
        threading.Thread(
            target=stream_events, args=(url, "/v1/chat/completions", SHORT, short_started, short), daemon=True
        ),
    ]
    threads[0].start()
    assert long_started.wait(120), "".join(server.stderr)
    threads[1].start()
    assert short_started.wait(120)
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(120)

    assert server.proc.wait(timeout=120) == 0, "".join(server.stderr)
    # The short stream finished normally; the long one was cut at the timeout with an error event.
    assert short[-1] == "[DONE]"
    assert short[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert long[-1]["error"]["code"] == "shutting_down"
    assert len(long) < 30_000 and all("choices" in chunk for chunk in long[:-1])
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=5)
    logs = [json.loads(line) for line in server.stderr if line.startswith('{"event": "request"')]
    assert any(entry["route"] == "/v1/chat/completions" and entry["status"] == 200 for entry in logs)
    assert all(entry.get("key_id", "key-").startswith("key-") for entry in logs)
    assert "secret story" not in "".join(server.stderr) and KEY not in "".join(server.stderr)


def test_a_second_server_on_the_same_port_fails_in_one_line(server: Server) -> None:
    url = server.wait_for_url()
    port = url.rsplit(":", 1)[1]
    env = {**os.environ, "QWENKIT_API_KEY": KEY}
    second = subprocess.run(
        [sys.executable, "-c", RUN_SERVE, "--port", port],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert second.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    assert "Traceback" not in second.stderr and "random" not in second.stderr  # failed before loading
