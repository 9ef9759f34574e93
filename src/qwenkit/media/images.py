"""Decode, check and size one image for a Qwen vision model: bytes in, an engine ImageInput out.

Contract: decode_image(data, limits) accepts PNG, JPEG, WebP and static GIF only and refuses anything
else (not an image, SVG, truncated or corrupt data, animation, a side under MIN_SIDE pixels, an aspect
ratio over MAX_ASPECT, more than limits.max_pixels pixels, more than limits.max_bytes bytes) with a
MediaError whose one-line message names the limit or the fix. The pixel cap is checked from the header,
before the pixels are decoded, so a decompression bomb costs nothing. Transparency is composited onto
white and every mode becomes RGB, as transformers' processors do. prepare_image(image, spec) resizes the
pixels to the processor's grid (smart_resize: multiples of patch x merge, within min/max pixels, PIL
bicubic as transformers uses), so llama.cpp needs no resize of its own and its input equals transformers';
the result is an ImageInput (pixels + sha256 of size and pixels) and image_tokens() its token count.
VisionSpec says a model's patch grid and pixel bounds, read from preprocessor_config.json or an mmproj GGUF;
its upper bound is also held to ENGINE_MAX_IMAGE_TOKENS (llama.cpp's own cap), so the engine never resizes
what the edge sized and counted (an image that big, 2048x2048 and up, gets fewer tokens than transformers
would give it).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwenkit.engines.request import ImageInput

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ENGINE_MAX_IMAGE_TOKENS",
    "MAX_ASPECT",
    "MIN_SIDE",
    "ImageLimits",
    "MediaError",
    "VisionSpec",
    "decode_image",
    "image_tokens",
    "load_image",
    "prepare_image",
    "smart_resize",
]

# Defaults of the serve/CLI caps. 8 MiB holds a full-quality 24 MP JPEG; 25 MP is a 6000x4000 camera frame
# (75 MB of RGB once decoded); 8 images keep one request's decode memory under 1 GB.
DEFAULT_MAX_IMAGE_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
DEFAULT_MAX_IMAGES = 8
# llama.cpp's mtmd resizes a Qwen image to at most 4096 tokens by default: the edge sizes to no more.
ENGINE_MAX_IMAGE_TOKENS = 4096
MIN_SIDE = 4  # fewer pixels on a side hold no picture; a 1-pixel image is a mistake or a probe
MAX_ASPECT = 200  # transformers' smart_resize refuses a longer side over 200x the shorter
ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF"}
_ACCEPTED = "send a PNG, JPEG, WebP or (static) GIF image"


class MediaError(ValueError):
    """An image (or its source) that cannot be used; the message is one line naming the limit or fix.
    code: a short machine-readable reason ("image_too_large", "invalid_image", "media_fetch_refused")."""

    def __init__(self, message: str, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Caps on one image: encoded bytes and decoded pixels (width x height)."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


@dataclass(frozen=True, slots=True)
class VisionSpec:
    """A vision tower's input grid: patch_size x merge_size pixels per image token, and the processor's
    pixel bounds (images are resized to fit between min_pixels and max_pixels)."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @property
    def factor(self) -> int:
        """Pixels per image token along each side."""
        return self.patch_size * self.merge_size

    @classmethod
    def for_projector(
        cls, projector: str, patch_size: int | None = None, merge_size: int | None = None
    ) -> VisionSpec:
        """The hub processors' bounds for a projector family: Qwen2.5-VL (patch 14, 3136..12845056 pixels),
        Qwen3-VL / Qwen3.5 (patch 16, 65536..16777216 pixels)."""
        if projector in ("qwen2.5vl_merger", "qwen2vl_merger", "qwen2_5_vl", "qwen2_vl"):
            return cls.bounded(patch_size or 14, merge_size or 2, 3136, 12845056)
        return cls.bounded(patch_size or 16, merge_size or 2, 65536, 16777216)

    @classmethod
    def bounded(cls, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int) -> VisionSpec:
        """A spec whose max_pixels is held to ENGINE_MAX_IMAGE_TOKENS image tokens."""
        cap = ENGINE_MAX_IMAGE_TOKENS * (patch_size * merge_size) ** 2
        return cls(patch_size, merge_size, min_pixels, min(max_pixels, cap))

    @classmethod
    def from_processor_config(cls, data: Mapping[str, Any], model_type: str = "") -> VisionSpec:
        """From a preprocessor_config.json: min/max_pixels, or size.shortest_edge/longest_edge (newer
        processors), falling back to the model family's hub values."""
        base = cls.for_projector(model_type, data.get("patch_size"), data.get("merge_size"))
        size = data.get("size") if isinstance(data.get("size"), Mapping) else {}
        low = data.get("min_pixels") or size.get("shortest_edge") or base.min_pixels
        high = data.get("max_pixels") or size.get("longest_edge") or base.max_pixels
        return cls.bounded(base.patch_size, base.merge_size, int(low), int(high))

    @classmethod
    def from_checkpoint(cls, directory: Path) -> VisionSpec | None:
        """A checkpoint directory's spec (preprocessor_config.json), None when it has none."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text("utf-8"))
            config = json.loads((Path(directory) / "config.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, Mapping):
            return None
        return cls.from_processor_config(data, str(config.get("model_type", "")))

    @classmethod
    def from_mmproj(cls, path: Path) -> VisionSpec:
        """A projector GGUF's spec: its patch and merge size, the processor bounds of its projector type."""
        from qwenkit.gguf.reader import MetadataReader

        reader = MetadataReader(Path(path))

        def value(key: str) -> Any:
            field = reader.get_field(key)
            return None if field is None else field.contents()

        patch, merge = value("clip.vision.patch_size"), value("clip.vision.spatial_merge_size")
        projector = str(value("clip.projector_type") or "")
        return cls.for_projector(projector, int(patch) if patch else None, int(merge) if merge else None)


def _looks_like_svg(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<svg", b"<?xml", b"<!doctype svg")) or b"<svg" in head


def decode_image(data: bytes, limits: ImageLimits | None = None, what: str = "image") -> np.ndarray:
    """The image's RGB pixels (height, width, 3) uint8, or MediaError (see the module docstring)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MediaError("images need Pillow: pip install 'qwenkit[cpu]'", "images_not_supported") from None

    limits = limits or ImageLimits()

    if len(data) > limits.max_bytes:
        raise MediaError(
            f"{what} is {len(data)} bytes, over the limit of {limits.max_bytes} bytes (--max-image-bytes); "
            "send a smaller or more compressed image",
            "image_too_large",
        )
    if not data:
        raise MediaError(f"{what} is empty: {_ACCEPTED}")
    if _looks_like_svg(data):
        raise MediaError(f"{what} is an SVG drawing, which is not accepted: {_ACCEPTED}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard (over ~89 million pixels) fired while reading the header.
        raise MediaError(
            f"{what} is over the limit of {limits.max_pixels} pixels (--max-image-pixels); "
            "send a smaller image",
            "image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise MediaError(f"{what} is not a readable image: {_ACCEPTED}") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise MediaError(f"{what} is truncated or corrupt: {_ACCEPTED}") from None
    with img:
        if img.format not in ACCEPTED_FORMATS:
            raise MediaError(
                f"{what} is a {img.format or 'unknown'} file, which is not accepted: {_ACCEPTED}"
            )
        width, height = img.size
        if width * height > limits.max_pixels:
            raise MediaError(
                f"{what} is {width}x{height} = {width * height} pixels, over the limit of "
                f"{limits.max_pixels} pixels (--max-image-pixels); send a smaller image",
                "image_too_large",
            )
        if min(width, height) < MIN_SIDE:
            raise MediaError(f"{what} is {width}x{height} pixels: each side needs at least {MIN_SIDE} pixels")
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise MediaError(
                f"{what} is {width}x{height} pixels: the longer side may be at most {MAX_ASPECT}x the shorter"
            )
        if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
            raise MediaError(f"{what} is animated ({img.n_frames} frames): send a single still frame")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
                rgb = _to_rgb(img)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
            raise MediaError(f"{what} is truncated or corrupt: {_ACCEPTED}") from None
        return np.asarray(rgb, dtype=np.uint8).copy()


def _to_rgb(img: Any) -> Any:
    from PIL import Image

    if img.mode == "RGB":
        return img
    # transformers' convert_to_rgb: transparency over a white background, then RGB.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def smart_resize(height: int, width: int, spec: VisionSpec) -> tuple[int, int]:
    """transformers' Qwen2-VL smart_resize: the (height, width) nearest the original, both multiples of
    spec.factor, with min_pixels <= height x width <= max_pixels."""
    factor = spec.factor
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > spec.max_pixels:
        beta = math.sqrt((height * width) / spec.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < spec.min_pixels:
        beta = math.sqrt(spec.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_tokens(pixels: np.ndarray, spec: VisionSpec) -> int:
    """The image tokens a prepared image (sides multiples of spec.factor) becomes in the prompt."""
    height, width = pixels.shape[:2]
    return (height // spec.factor) * (width // spec.factor)


def _sha256(pixels: np.ndarray) -> str:
    # The size is part of the key: the same bytes in another shape are another picture.
    height, width = pixels.shape[:2]
    digest = hashlib.sha256(f"{width}x{height}:".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def prepare_image(pixels: np.ndarray, spec: VisionSpec | None) -> ImageInput:
    """The engine's input for decoded pixels: resized to the processor's grid (when a spec is known)."""
    if spec is not None:
        height, width = pixels.shape[:2]
        target = smart_resize(height, width, spec)
        if target != (height, width):
            from PIL import Image

            resized = Image.fromarray(pixels).resize((target[1], target[0]), Image.Resampling.BICUBIC)
            pixels = np.asarray(resized, dtype=np.uint8).copy()
    return ImageInput(pixels=pixels, sha256=_sha256(pixels))


def load_image(
    data: bytes, spec: VisionSpec | None, limits: ImageLimits | None = None, what: str = "image"
) -> ImageInput:
    """decode_image then prepare_image: bytes to the engine's ImageInput."""
    return prepare_image(decode_image(data, limits, what), spec)
