"""The web console: its files served at / with a strict CSP and without a key (the API still needs it), no
inline code and no HTML insertion of text; and (slow) a real Chromium driven by Playwright against the live
tiny Qwen3.5 demo server: key prompt, streamed answer with reasoning apart, stop, a tool call and its
result, status page updating.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qwenkit.chat.families import choose_family
from qwenkit.gguf.reader import read_gguf_info
from qwenkit.serve.config import ServeConfig
from qwenkit.serve.console import CSP, asset
from qwenkit.serve.console import FILES as ROUTES
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import API_KEY, WEATHER, FakeEngine, LiveServer, fake_app, in_process, live_server

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(
    os.environ.get("QWENKIT_CONSOLE_SCREENSHOTS", Path(tempfile.gettempdir()) / "qwenkit-console-screenshots")
)
FILES = {"/": "text/html", "/console/app.js": "text/javascript", "/console/app.css": "text/css"}


@pytest.fixture(scope="module")
def client(demo_checkpoint: Callable[..., Path]) -> Iterator[TestClient]:
    engine = FakeEngine(QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny")))
    config = ServeConfig(api_keys=(API_KEY,))  # type: ignore[arg-type]
    with in_process(fake_app(engine, config)) as c:
        yield c


@pytest.mark.parametrize("path", list(FILES))
def test_console_files_are_served_without_a_key_under_a_strict_csp(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(FILES[path])
    csp = r.headers["content-security-policy"]
    assert csp == CSP
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.content == asset(ROUTES[path][0])


def test_only_the_console_files_skip_the_key(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/console/other.js").status_code == 401
    assert client.get("/console/").status_code == 401
    # Nothing in the request picks the file: a query is ignored.
    assert client.get("/?name=../../pyproject.toml").content == asset("index.html")
    assert client.post("/").status_code in (401, 405)


def test_page_has_no_inline_code_and_inserts_text_only() -> None:
    html = asset("index.html").decode()
    js = asset("app.js").decode()
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/console/app.js" defer>']
    assert not re.search(r"\son\w+\s*=", html)  # no inline event handlers
    assert " style=" not in html
    assert "http://" not in html + js and "https://" not in html + js  # no CDN
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    assert "sessionStorage" in js and "localStorage" not in js  # the key stays in this tab


# ---- a real browser --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[LiveServer]:
    # Qwen3.5's template opens <think> in the prompt, so even random weights answer with reasoning first.
    config = ServeConfig(api_keys=(API_KEY,))  # type: ignore[arg-type]
    gguf, checkpoint = demo_gguf("qwen3_5", "tiny", "f32"), demo_checkpoint("qwen3_5", "tiny")
    info = read_gguf_info(gguf)
    family, _ = choose_family(info.chat_template, info.architecture)
    with live_server(gguf, checkpoint, config, n_ctx=8192, max_seqs=2, family=family) as server:
        yield server


def _wait_idle(live: LiveServer) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = live.engine.stats()
        if stats.running == 0 and stats.waiting == 0:
            return 0
        time.sleep(0.05)
    return live.engine.stats().running


@pytest.mark.slow
def test_console_in_chromium(live: LiveServer) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    csp_errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on(
            "console",
            lambda m: csp_errors.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)
        page.goto(live.base_url + "/")
        # The page asks for the key once and keeps it in this tab's sessionStorage.
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#key-input", API_KEY)
        page.click("#key-form button[type=submit]")
        expect(page.locator("#model-name")).not_to_have_text("")
        expect(page.locator("#key-form")).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('qwenkit.apiKey')") == API_KEY
        assert page.evaluate("localStorage.length") == 0

        # The status page once before any traffic, so tokens/s has a starting point.
        page.click("#tab-status")
        expect(page.locator("#s-updated")).not_to_have_text("never")
        page.click("#tab-chat")

        # A streamed answer with thinking: reasoning in its own block, the answer apart.
        page.fill("#budget", "6")
        page.fill("#max-tokens", "48")
        page.fill("#prompt", "<b>Hello</b> there")
        page.click("#send")
        expect(page.locator(".msg.assistant .finish").first).to_have_text(re.compile("^finish: "))
        user_msg = page.locator(".msg.user .content").first
        assert user_msg.text_content() == "<b>Hello</b> there"  # text, never HTML
        assert page.locator(".msg.user b").count() == 0
        reasoning = (
            page.locator(".msg.assistant details.reasoning .reasoning-text").first.text_content() or ""
        )
        answer = page.locator(".msg.assistant .content").first.text_content() or ""
        assert reasoning.strip() and answer.strip(), (
            reasoning,
            answer,
            page.text_content(".msg.assistant .finish"),
        )
        assert reasoning not in answer and "<think>" not in answer
        assert (
            page.locator(".msg.assistant details.reasoning").first.get_attribute("open") is None
        )  # collapsed

        # Presets: listed from /v1/presets; picking one sets its thinking mode and names its arguments.
        expect(page.locator("#preset option")).to_have_count(4)  # none + the built-in three
        page.uncheck("#thinking")
        page.select_option("#preset", "reasoning")
        assert page.is_checked("#thinking")
        page.select_option("#preset", "coding")
        assert "language=Python" in (page.get_attribute("#preset-args", "placeholder") or "")
        page.select_option("#preset", "")

        # Stop: a long generation without thinking, stopped once text streams in; the server frees the slot.
        page.uncheck("#thinking")
        page.fill("#max-tokens", "4000")
        page.fill("#prompt", "Write a long story")
        page.click("#send")
        last = page.locator(".msg.assistant").last
        expect(last.locator(".content")).to_have_text(re.compile(r"^[\s\S]{20,}$"))
        assert page.is_enabled("#stop")
        # The page keeps scrolling while text streams in, so a positional click can chase the button.
        page.locator("#stop").dispatch_event("click")
        expect(last.locator(".finish")).to_have_text("stopped")
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
        assert _wait_idle(live) == 0
        assert "finish" not in (last.locator(".finish").text_content() or "")

        # A tool call: shown with a box for its result; sending the result continues the conversation.
        page.click("#tools-box summary")
        page.fill("#tools", json.dumps([WEATHER]))
        page.select_option("#tool-choice", "required")
        page.fill("#max-tokens", "200")
        page.fill("#prompt", "Weather in Paris?")
        page.click("#send")
        # The random-weight model may call once or twice (parallel calls); every call gets a box, and the
        # conversation goes on once each has its result.
        expect(page.locator(".msg.assistant").last.locator(".finish")).to_have_text("finish: tool_calls")
        calls = page.locator(".msg.assistant").last.locator(".tool-call")
        assert calls.count() >= 1
        assistants = page.locator(".msg.assistant").count()
        for i in range(calls.count()):
            call = calls.nth(i)
            expect(call.locator("div").first).to_have_text("Tool call: get_weather")
            assert json.loads(call.locator("pre").text_content() or "")["city"] in ("Paris", "Rome")
            call.locator("textarea").fill('{"temperature": 21}')
            call.locator("button").click()
        expect(page.locator(".msg.assistant")).to_have_count(assistants + 1)
        expect(page.locator(".msg.assistant").last.locator(".finish")).to_have_text(re.compile("^finish: "))
        assert page.text_content("#chat-error") == ""
        page.fill("#tools", "")
        page.locator(".msg.assistant details.reasoning summary").first.click()  # unfold the reasoning
        page.screenshot(path=str(SCREENSHOTS / "console-chat.png"), full_page=True)

        # The status page updates: tokens/s from the tokens generated since its last read, the checks.
        page.click("#tab-status")
        expect(page.locator("#s-tps")).to_have_text(re.compile(r"^(?!0\.0$)\d+\.\d$"))  # above 0
        expect(page.locator("#checks tbody tr")).to_have_count(6)
        page.screenshot(path=str(SCREENSHOTS / "console-status.png"), full_page=True)
        first = page.text_content("#s-updated") or ""
        expect(page.locator("#s-updated")).not_to_have_text(first)
        assert page.text_content("#s-kv") != "–"
        assert "GiB" in (page.text_content("#s-memory") or "") or "MiB" in (
            page.text_content("#s-memory") or ""
        )
        checks = page.locator("#checks tbody tr td:first-child").all_text_contents()
        assert "decode speed" in checks and "truncated answers" in checks
        expect(page.locator("#key-form")).to_be_hidden()  # the key was asked once
        browser.close()
    assert csp_errors == []
