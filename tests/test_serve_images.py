"""Images through the server: OpenAI image_url parts (and Anthropic / Ollama image inputs) reach the engine
as decoded, grid-sized ImageInputs with one <|image_pad|> each; usage counts the image tokens; every bad
input of issue 14 is a 4xx in the API's error shape, and the server answers normally afterwards.

The engine here is the scripted FakeEngine: what is tested is the edge (parsing, caps, decoding, the
request the engine is handed), which a text engine without a projector cannot run for real."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from qwenkit.chat.families import QWEN3_5
from qwenkit.media import VisionSpec, smart_resize
from qwenkit.serve.app import create_app
from qwenkit.serve.config import ServeConfig
from qwenkit.tokenizer.specials import IMAGE_PAD
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import MODEL, FakeEngine, in_process

Image = pytest.importorskip("PIL.Image")

SPEC = VisionSpec(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216)


def _png(height: int, width: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _ask(*parts: dict[str, Any], **body: Any) -> dict[str, Any]:
    content = [*parts, {"type": "text", "text": "What is in this picture?"}]
    return {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": content}], **body}


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Callable[..., Path]) -> QwenTokenizer:
    return QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))


@pytest.fixture
def serve(tokenizer: QwenTokenizer) -> Callable[..., Any]:
    """serve(config, vision) → (engine, client) over a FakeEngine that answers "a cat"."""
    clients: list[Any] = []

    def start(
        config: ServeConfig | None = None, vision: VisionSpec | None = SPEC
    ) -> tuple[FakeEngine, TestClient]:
        engine = FakeEngine(tokenizer, script=lambda request: "a cat", n_ctx=8192)
        app = create_app(engine, tokenizer, QWEN3_5, MODEL, config, vision=vision)  # type: ignore[arg-type]
        ctx = in_process(app)
        clients.append(ctx)
        return engine, ctx.__enter__()

    yield start
    for ctx in clients:
        ctx.__exit__(None, None, None)


def test_images_reach_the_engine_sized_and_in_order(
    serve: Callable[..., Any], tokenizer: QwenTokenizer
) -> None:
    engine, http = serve()
    small, wide = _png(100, 150, seed=1), _png(300, 700, seed=2)
    response = http.post("/v1/chat/completions", json=_ask(_part(_url(small)), _part(_url(wide))))
    assert response.status_code == 200, response.text
    [request] = engine.requests
    assert [i.pixels.shape[:2] for i in request.images] == [
        smart_resize(100, 150, SPEC),
        smart_resize(300, 700, SPEC),
    ]
    pad = tokenizer.special_id(IMAGE_PAD)
    assert request.prompt_token_ids.count(pad) == 2
    # usage counts each image at its token size (its placeholder is one of the prompt ids).
    tokens = sum(h * w // SPEC.factor**2 for h, w in (i.pixels.shape[:2] for i in request.images))
    assert response.json()["usage"]["prompt_tokens"] == len(request.prompt_token_ids) - 2 + tokens


def test_the_same_picture_keys_the_same_hash_whatever_its_encoding(serve: Callable[..., Any]) -> None:
    engine, http = serve()
    pixels = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    encoded = []
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **kw)
        encoded.append(buf.getvalue())
    for data in encoded:
        assert http.post("/v1/chat/completions", json=_ask(_part(_url(data)))).status_code == 200
    first, second = (r.images[0].sha256 for r in engine.requests)
    assert first == second


def test_a_text_only_model_refuses_images(serve: Callable[..., Any]) -> None:
    engine, http = serve(vision=None)
    response = http.post("/v1/chat/completions", json=_ask(_part(_url(_png(64, 64)))))
    assert response.status_code == 400
    error = response.json()["error"]
    assert (
        error["message"].startswith("this model has no vision projector") and "--mmproj" in error["message"]
    )
    assert error["code"] == "images_not_supported" and engine.requests == []


def test_the_context_counts_image_tokens(serve: Callable[..., Any]) -> None:
    # A 2048x2048 image is 4096 image tokens: with max_tokens 4096 it no longer fits the 8192 context.
    _, http = serve()
    buf = io.BytesIO()
    Image.new("RGB", (2048, 2048), (200, 30, 30)).save(buf, format="PNG")  # one colour: a small file
    response = http.post("/v1/chat/completions", json=_ask(_part(_url(buf.getvalue())), max_tokens=4096))
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def _header_only_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _animated() -> bytes:
    frames = [Image.new("RGB", (16, 16), (i * 80, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    return buf.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
# (case, image URL or a whole content part, words the message must hold); the server config is CAPPED.
BAD: list[tuple[str, Any, str]] = [
    ("not an image", _url(b"GIF? no, plain text"), "not a readable image"),
    ("truncated png", _url(_png(64, 64)[:200]), "truncated or corrupt"),
    ("one pixel", _url(_png(1, 1)), "at least 4 pixels"),
    ("20000x20000", _url(_header_only_png(20000, 20000)), "--max-image-pixels"),
    ("svg", _url(SVG, "image/svg+xml"), "SVG"),
    ("animated gif", _url(_animated(), "image/gif"), "animated"),
    ("data url not base64", "data:image/png,hello", "not base64"),
    ("bad base64", "data:image/png;base64,!!!!", "not valid base64"),
    ("over the byte cap", _url(_png(200, 200)), "--max-image-bytes"),
    ("over the pixel cap", _url(_png(120, 120)), "over the limit of 10000 pixels"),
    ("private address", "http://10.0.0.1/cat.png", "--allow-remote-media"),
    ("metadata address", "http://169.254.169.254/latest/meta-data/", "--allow-remote-media"),
    ("file url", "file:///etc/passwd", "never read over HTTP"),
    ("unknown scheme", "gopher://example.com/x", "unsupported image URL scheme"),
    ("no url", {"type": "image_url", "image_url": {}}, "an image_url part needs"),
    ("bad detail", {"type": "image_url", "image_url": {"url": "data:,", "detail": "max"}}, "detail"),
]
CAPPED = ServeConfig(max_image_bytes=60_000, max_image_pixels=10_000, max_images=2)


@pytest.mark.parametrize(("case", "url", "words"), BAD, ids=[c for c, _, _ in BAD])
def test_bad_images_are_4xx_and_the_server_goes_on(
    serve: Callable[..., Any], case: str, url: Any, words: str
) -> None:
    engine, http = serve(CAPPED)
    part = url if isinstance(url, dict) else _part(url)
    response = http.post("/v1/chat/completions", json=_ask(part))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and words in error["message"], error
    assert "Traceback" not in response.text and engine.requests == []
    ok = http.post("/v1/chat/completions", json=_ask(_part(_url(_png(64, 64)))))
    assert ok.status_code == 200 and len(engine.requests) == 1


def test_too_many_images_and_misplaced_images(serve: Callable[..., Any]) -> None:
    _, http = serve(CAPPED)
    part = _part(_url(_png(32, 32)))
    response = http.post("/v1/chat/completions", json=_ask(part, part, part))
    assert response.status_code == 400 and "--max-images" in response.json()["error"]["message"]
    system = {
        "model": MODEL,
        "messages": [{"role": "system", "content": [part]}, {"role": "user", "content": "hi"}],
    }
    response = http.post("/v1/chat/completions", json=system)
    assert response.status_code == 400 and "system messages cannot contain images" in response.text


def test_private_addresses_are_refused_even_with_remote_media_on(serve: Callable[..., Any]) -> None:
    _, http = serve(ServeConfig(allow_remote_media=True))
    for url in ("http://127.0.0.1:9/x.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png"):
        response = http.post("/v1/chat/completions", json=_ask(_part(url)))
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "media_fetch_refused", response.text


def test_anthropic_ollama_and_responses_images_take_the_same_path(serve: Callable[..., Any]) -> None:
    engine, http = serve()
    data = base64.b64encode(_png(64, 64)).decode()
    anthropic = {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    }
    assert http.post("/v1/messages", json=anthropic).status_code == 200
    ollama = {
        "model": MODEL,
        "stream": False,
        "messages": [{"role": "user", "content": "What?", "images": [data]}],
    }
    assert http.post("/api/chat", json=ollama).status_code == 200
    image = {"type": "input_image", "image_url": f"data:image/png;base64,{data}", "detail": "low"}
    responses = {
        "model": MODEL,
        "max_output_tokens": 8,
        "input": [{"role": "user", "content": [image, {"type": "input_text", "text": "What is this?"}]}],
    }
    assert http.post("/v1/responses", json=responses).status_code == 200
    assert [len(r.images) for r in engine.requests] == [1, 1, 1]
    assert len({r.images[0].sha256 for r in engine.requests}) == 1
    # Only user turns carry images, as in the chat API.
    misplaced = {
        **responses,
        "input": [{"role": "assistant", "content": [image]}, {"role": "user", "content": "x"}],
    }
    response = http.post("/v1/responses", json=misplaced)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    bad = {
        **ollama,
        "messages": [{"role": "user", "content": "x", "images": [base64.b64encode(SVG).decode()]}],
    }
    response = http.post("/api/chat", json=bad)
    assert response.status_code == 400 and "SVG" in response.json()["error"]


# --- end to end: the real llama.cpp engine with the tiny Qwen3.5 demo's own vision projector -------------


@pytest.fixture(scope="module")
def vl_server(
    demo_checkpoint: Callable[..., Path],
    demo_gguf: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    from qwenkit.chat.families import choose_family, template_from_dir
    from qwenkit.engines.llamacpp.config import EngineConfig
    from qwenkit.engines.llamacpp.engine import LlamaCppEngine
    from qwenkit.gguf.mmproj import convert_mmproj

    checkpoint = demo_checkpoint("qwen3_5", "tiny")
    mmproj = convert_mmproj(checkpoint, tmp_path_factory.mktemp("mmproj") / "mmproj-f32.gguf", "f32")
    config = EngineConfig.for_workload(2, 4096, threads=2, max_waiting=8, mmproj=mmproj)
    engine = LlamaCppEngine(demo_gguf("qwen3_5", "tiny", "f32"), config)
    family, _ = choose_family(template_from_dir(checkpoint), "qwen3_5")
    tokenizer = QwenTokenizer.from_dir(checkpoint)
    spec = VisionSpec.from_mmproj(mmproj)
    app = create_app(engine, tokenizer, family, MODEL, vision=spec)
    with in_process(app) as http:
        yield http, engine, spec


def test_an_image_request_runs_end_to_end(vl_server: Any) -> None:
    http, engine, spec = vl_server
    assert spec.factor == 32  # read from the projector: patch 16, merge 2
    body = _ask(_part(_url(_png(256, 320, seed=4))), max_tokens=4, temperature=0)
    before = _prompt_tokens_metric(http)
    first = http.post("/v1/chat/completions", json=body)
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]
    # The edge's count (usage) is the engine's own (the metric adds what the engine reports).
    assert _prompt_tokens_metric(http) - before == usage["prompt_tokens"]
    assert engine.image_encodes == 1
    # 256x320 is on Qwen3.5's grid already: 8 x 10 = 80 image tokens, counted in the prompt.
    text_only = http.post(
        "/v1/chat/completions",
        json={**body, "messages": [{"role": "user", "content": "What is in this picture?"}]},
    ).json()["usage"]
    # The image adds <|vision_start|>, its 80 tokens and <|vision_end|>.
    assert usage["prompt_tokens"] - text_only["prompt_tokens"] == 80 + 2
    # The same picture again: its prefix (image included) is reused, not re-encoded.
    second = http.post("/v1/chat/completions", json=body)
    assert second.status_code == 200
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 80
    assert engine.image_encodes == 1
    # Bad input through the real engine's server is still a 400, and it goes on serving.
    assert http.post("/v1/chat/completions", json=_ask(_part(_url(SVG, "image/svg+xml")))).status_code == 400
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def _prompt_tokens_metric(http: Any) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("qwenkit_prompt_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no qwenkit_prompt_tokens_total in /metrics")
