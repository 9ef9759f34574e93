"""Images at the edge (qwenkit.media): decoding and its refusals, sizing to the processor grid, data URLs
and the remote-fetch rules (a real local HTTP server; loopback is refused unless a test lifts the check)."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from qwenkit.media import (  # noqa: E402
    FetchPolicy,
    ImageLimits,
    MediaError,
    VisionSpec,
    decode_image,
    image_tokens,
    load_images,
    prepare_image,
    read_image_source,
    smart_resize,
    sources,
)
from qwenkit.media.images import ENGINE_MAX_IMAGE_TOKENS  # noqa: E402

QWEN3_5 = VisionSpec(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216)
QWEN2_5_VL = VisionSpec(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)


def _pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(pixels: np.ndarray, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and that holds one row's worth of pixel data at most."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * min(width, 64)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


# --- decoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "JPEG"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    pixels = _pixels(40, 60)
    if fmt == "GIF":  # a palette format: use few colours so the round trip is exact
        pixels = (pixels // 128 * 255).astype(np.uint8)
    if fmt == "JPEG":  # lossy: a smooth picture survives it closely, noise would not
        ramp = np.linspace(0, 255, 60, dtype=np.uint8)
        pixels = np.stack([np.tile(ramp, (40, 1))] * 3, axis=-1)
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    got = decode_image(_encode(pixels, fmt, **kwargs))
    assert got.shape == (40, 60, 3) and got.dtype == np.uint8
    if fmt == "JPEG":
        assert np.abs(got.astype(int) - pixels).max() < 16
    else:
        assert np.array_equal(got, pixels)


def test_transparency_is_composited_on_white() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4, :, :] = (10, 20, 30, 255)  # top half opaque, bottom half fully transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    got = decode_image(buf.getvalue())
    assert tuple(got[0, 0]) == (10, 20, 30) and tuple(got[7, 7]) == (255, 255, 255)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(_pixels(16, 16, seed)) for seed in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


BAD_IMAGES: dict[str, tuple[Callable[[], bytes], str]] = {
    "not an image": (lambda: b"hello, this is text and not a picture", "not a readable image"),
    "empty": (lambda: b"", "empty"),
    "truncated png": (lambda: _encode(_pixels(64, 64), "PNG")[:300], "truncated or corrupt"),
    "svg": (
        lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "SVG",
    ),
    "animated gif": (_animated_gif, "animated"),
    "one pixel": (lambda: _encode(_pixels(1, 1), "PNG"), "at least 4 pixels"),
    "20000x20000": (lambda: _png_header_only(20000, 20000), "over the limit of 25000000 pixels"),
    "aspect 300:1": (lambda: _encode(_pixels(4, 1200), "PNG"), "at most 200x"),
    "bmp": (lambda: _encode(_pixels(8, 8), "BMP"), "BMP file"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_refused_naming_the_rule(case: str) -> None:
    make, words = BAD_IMAGES[case]
    with pytest.raises(MediaError, match=words) as info:
        decode_image(make())
    assert "\n" not in str(info.value)


def test_the_pixel_cap_is_read_from_the_header_before_any_decode() -> None:
    # The header claims 20000x20000 and there are no pixels: a decode would fail as truncated, so the
    # pixel-cap message proves the check came first. The cap is the caller's.
    with pytest.raises(MediaError, match="over the limit of 1000 pixels") as info:
        decode_image(_png_header_only(100, 100), ImageLimits(max_pixels=1000))
    assert info.value.code == "image_too_large"
    with pytest.raises(MediaError, match="truncated"):
        decode_image(_png_header_only(100, 100))


def test_the_byte_cap_names_the_flag() -> None:
    data = _encode(_pixels(64, 64), "PNG")
    with pytest.raises(MediaError, match=r"over the limit of 100 bytes \(--max-image-bytes\)"):
        decode_image(data, ImageLimits(max_bytes=100))


# --- sizing to the processor grid --------------------------------------------------------------------------


def test_smart_resize_equals_transformers() -> None:
    pil_qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    sizes = [(4, 4), (10, 1900), (37, 53), (224, 224), (256, 320), (480, 640), (1080, 1920), (5000, 4000)]
    for spec in (QWEN3_5, QWEN2_5_VL):
        for h, w in sizes:
            theirs = pil_qwen2_vl.smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
            assert smart_resize(h, w, spec) == tuple(theirs), (spec, h, w)


def test_prepare_image_sizes_to_the_grid_and_counts_tokens() -> None:
    image = prepare_image(_pixels(100, 150), QWEN3_5)  # under min_pixels: upsized as transformers does
    h, w = image.pixels.shape[:2]
    assert h % 32 == 0 and w % 32 == 0 and h * w >= QWEN3_5.min_pixels
    assert (h, w) == smart_resize(100, 150, QWEN3_5)
    assert image_tokens(image.pixels, QWEN3_5) == h * w // 32**2
    same = prepare_image(_pixels(256, 320), QWEN3_5)  # already on the grid: the pixels are kept
    assert np.array_equal(same.pixels, _pixels(256, 320))


def test_the_hash_keys_on_pixels_not_encoding() -> None:
    pixels = _pixels(64, 96)
    png = prepare_image(decode_image(_encode(pixels, "PNG")), None)
    webp = prepare_image(decode_image(_encode(pixels, "WEBP", lossless=True)), None)
    other = prepare_image(decode_image(_encode(_pixels(64, 96, seed=1), "PNG")), None)
    reshaped = prepare_image(pixels.reshape(96, 64, 3), None)
    assert png.sha256 == webp.sha256
    assert len({png.sha256, other.sha256, reshaped.sha256}) == 3


def test_vision_spec_from_processor_configs() -> None:
    # The processors' upper bounds (16384 and 16384 tokens) are held to llama.cpp's 4096-token cap.
    qwen35 = VisionSpec.from_processor_config(
        {"patch_size": 16, "merge_size": 2, "size": {"longest_edge": 16777216, "shortest_edge": 65536}},
        "qwen3_5",
    )
    assert qwen35 == VisionSpec(16, 2, 65536, ENGINE_MAX_IMAGE_TOKENS * 32**2)
    vl = VisionSpec.from_processor_config(
        {"patch_size": 14, "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056}, "qwen2_5_vl"
    )
    assert vl == VisionSpec(14, 2, 3136, ENGINE_MAX_IMAGE_TOKENS * 28**2)
    small = VisionSpec.from_processor_config({"patch_size": 16, "merge_size": 2, "max_pixels": 1 << 20}, "")
    assert small.max_pixels == 1 << 20  # a bound under the cap is kept
    big = prepare_image(np.zeros((3000, 3000, 3), dtype=np.uint8), qwen35)
    assert image_tokens(big.pixels, qwen35) <= ENGINE_MAX_IMAGE_TOKENS


# --- data URLs --------------------------------------------------------------------------------------------


def test_data_urls() -> None:
    data = _encode(_pixels(32, 32), "PNG")
    assert read_image_source(_data_url(data)) == data
    encoded = base64.b64encode(data).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert read_image_source("data:image/png;base64," + wrapped) == data  # MIME-style line breaks
    with pytest.raises(MediaError, match="not base64"):
        read_image_source("data:image/png," + "x" * 20)
    with pytest.raises(MediaError, match="not valid base64"):
        read_image_source("data:image/png;base64,@@@@not-base64@@@@")
    with pytest.raises(MediaError, match="over the limit of 10 bytes"):
        read_image_source(_data_url(data), FetchPolicy(max_bytes=10))
    with pytest.raises(MediaError, match="file:// URLs are never read"):
        read_image_source("file:///etc/passwd")
    with pytest.raises(MediaError, match="unsupported image URL scheme"):
        read_image_source("ftp://example.com/a.png")


def test_load_images_caps_the_count_and_names_the_image() -> None:
    good = _data_url(_encode(_pixels(32, 32), "PNG"))
    assert len(load_images([good, good], QWEN3_5, max_images=2)) == 2
    with pytest.raises(MediaError, match=r"3 images, over the limit of 2 per request \(--max-images\)"):
        load_images([good] * 3, QWEN3_5, max_images=2)
    with pytest.raises(MediaError, match=r"^image 2 is not a readable image"):
        load_images([good, _data_url(b"not an image")], QWEN3_5)


# --- remote fetches ---------------------------------------------------------------------------------------


class _Server:
    """A local HTTP server that records each request's path and Host header."""

    def __init__(self, routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]) -> None:
        self.seen: list[tuple[str, str]] = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Host", "")))
                routes.get(self.path, lambda h: h.send_error(404))(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


PNG = _encode(_pixels(32, 32), "PNG")


def _send(body: bytes, status: int = 200, headers: dict[str, str] | None = None, delay: float = 0.0) -> Any:
    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if delay:
            time.sleep(delay)
        h.wfile.write(body)

    return handle


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(
        {
            "/cat.png": _send(PNG),
            "/big.png": _send(b"\0" * 5000),
            "/moved": _send(b"", 302, {"Location": "http://169.254.169.254/latest/meta-data/"}),
            "/slow.png": _send(PNG, delay=3.0),
        }
    )
    yield srv
    srv.close()


REMOTE = FetchPolicy(allow_remote=True, max_bytes=4096, timeout=1.0)


def test_remote_urls_are_off_unless_allowed(server: _Server) -> None:
    with pytest.raises(MediaError, match="--allow-remote-media"):
        read_image_source(f"http://127.0.0.1:{server.port}/cat.png")
    assert server.seen == []


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "2002:7f00:1::",
    ],
)
def test_internal_addresses_are_refused(address: str) -> None:
    with pytest.raises(MediaError, match="public addresses only") as info:
        sources.check_public_address(address)
    assert info.value.code == "media_fetch_refused"


def test_public_addresses_pass_the_check() -> None:
    for address in ("93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"):
        assert str(sources.check_public_address(address)) == address


def test_a_loopback_server_is_never_contacted(server: _Server) -> None:
    for url in (f"http://127.0.0.1:{server.port}/cat.png", f"http://localhost:{server.port}/cat.png"):
        with pytest.raises(MediaError, match="public addresses only"):
            read_image_source(url, REMOTE)
    assert server.seen == []


def test_every_resolved_address_must_be_public(server: _Server) -> None:
    # One public and one private answer: refused, so a name cannot smuggle in an internal address.
    def resolve(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.0.0.5"]

    with pytest.raises(MediaError, match=r"10\.0\.0\.5"):
        read_image_source("http://images.example/cat.png", REMOTE, resolve=resolve)


@pytest.fixture
def lifted(monkeypatch: pytest.MonkeyPatch, server: _Server) -> Callable[[str], bytes]:
    """Fetch through the real client with the address check lifted, so the local server stands in for a
    public host; the name resolves to the server's address only through the resolver seam."""
    monkeypatch.setattr(sources, "check_public_address", lambda a: sources.ipaddress.ip_address(a))

    def fetch(path: str) -> bytes:
        url = f"http://images.example:{server.port}{path}"
        return read_image_source(url, REMOTE, resolve=lambda host, port: ["127.0.0.1"])

    return fetch


def test_the_fetch_connects_to_the_checked_address_keeping_the_name(
    lifted: Callable[[str], bytes], server: _Server
) -> None:
    assert lifted("/cat.png") == PNG
    assert server.seen == [("/cat.png", f"images.example:{server.port}")]


def test_redirects_are_refused_not_followed(lifted: Callable[[str], bytes], server: _Server) -> None:
    with pytest.raises(MediaError, match="redirect"):
        lifted("/moved")
    assert [path for path, _ in server.seen] == ["/moved"]


def test_remote_size_cap_and_timeout(lifted: Callable[[str], bytes]) -> None:
    with pytest.raises(MediaError, match="over the limit of 4096 bytes") as info:
        lifted("/big.png")
    assert info.value.code == "image_too_large"
    with pytest.raises(MediaError, match="took more than 1 s"):
        lifted("/slow.png")
    with pytest.raises(MediaError, match="HTTP 404"):
        lifted("/missing.png")
