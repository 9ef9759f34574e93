"""The web console attaches images (issue 16): the picker shows only when /v1/models says the model takes
images; a picked file goes out as an image_url data: URL part of the user message and reaches the engine
decoded. A real Chromium (Playwright) against a real uvicorn server; the engine is the scripted FakeEngine,
since the tiny text demo cannot read images."""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qwenkit.chat.families import QWEN3_5
from qwenkit.media import VisionSpec, smart_resize
from qwenkit.serve.app import create_app
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import MODEL, FakeEngine, in_process, serve_app

CHROMIUM = "/usr/bin/chromium"
SPEC = VisionSpec(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216)


def _server(engine: FakeEngine, vision: VisionSpec | None) -> contextlib.AbstractContextManager[str]:
    app = create_app(engine, engine.tokenizer, QWEN3_5, MODEL, vision=vision)  # type: ignore[arg-type]
    return serve_app(app)


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Callable[..., Path]) -> QwenTokenizer:
    return QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))


def test_models_say_whether_images_are_taken(tokenizer: QwenTokenizer) -> None:
    for vision, expected in ((SPEC, ["text", "image"]), (None, None)):
        app = create_app(FakeEngine(tokenizer), tokenizer, QWEN3_5, MODEL, vision=vision)  # type: ignore[arg-type]
        with in_process(app) as http:
            [card] = http.get("/v1/models").json()["data"]
            assert card.get("input_modalities") == expected


@pytest.mark.slow
def test_console_attaches_an_image_in_chromium(tokenizer: QwenTokenizer, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    Image = pytest.importorskip("PIL.Image")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    picture = tmp_path / "cat.png"
    pixels = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    picture.write_bytes(buf.getvalue())
    engine = FakeEngine(tokenizer, script=lambda request: "</think>\n\nA cat.")
    with _server(engine, SPEC) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(url + "/")
        sync_api.expect(page.locator("#image-label")).to_be_visible()
        page.set_input_files("#image-input", str(picture))
        sync_api.expect(page.locator("#attachments img")).to_have_count(1)
        page.fill("#prompt", "What is in this picture?")
        page.click("#send")
        sync_api.expect(page.locator(".msg.assistant .finish").first).to_have_text("finish: stop")
        sync_api.expect(page.locator(".msg.user .images img")).to_have_count(1)
        sync_api.expect(page.locator("#attachments img")).to_have_count(0)  # sent with that message only
        browser.close()
    [request] = engine.requests
    [image] = request.images
    assert image.pixels.shape[:2] == smart_resize(120, 200, SPEC)
    with _server(FakeEngine(tokenizer), None) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        sync_api.expect(page.locator("#model-name")).to_have_text(MODEL)
        sync_api.expect(page.locator("#image-label")).to_be_hidden()  # a text-only model: no picker
        browser.close()
