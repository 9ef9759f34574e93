"""Images at the edge: read (data URL, opt-in remote URL, local file), decode, check and size them for the
engine. Nothing here knows chat or HTTP; the server and the CLI call it and map MediaError to their errors.

Contract: load_images(urls, spec, limits, policy, max_images) reads and prepares each image in order (see
media.images and media.sources for the rules) and raises MediaError naming the first image that fails, or
the images-per-request cap. Pillow does the decoding (the `cpu` extra installs it); it is imported only
when an image arrives.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwenkit.engines.request import ImageInput
from qwenkit.media.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGES,
    ImageLimits,
    MediaError,
    VisionSpec,
    decode_image,
    image_tokens,
    load_image,
    prepare_image,
    smart_resize,
)
from qwenkit.media.sources import FetchPolicy, read_image_file, read_image_source

__all__ = [
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FetchPolicy",
    "ImageLimits",
    "MediaError",
    "VisionSpec",
    "check_image_count",
    "decode_image",
    "image_tokens",
    "load_image",
    "load_images",
    "prepare_image",
    "read_image_file",
    "read_image_source",
    "smart_resize",
]


def check_image_count(count: int, max_images: int) -> None:
    """MediaError when a request holds more images than the cap."""
    if count > max_images:
        raise MediaError(
            f"the request has {count} images, over the limit of {max_images} per request (--max-images)",
            "too_many_images",
        )


def load_images(
    urls: Sequence[str],
    spec: VisionSpec | None,
    limits: ImageLimits | None = None,
    policy: FetchPolicy | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> list[ImageInput]:
    """Every image URL read, decoded and sized for the engine, in order (MediaError on the first bad one)."""
    check_image_count(len(urls), max_images)
    limits, policy = limits or ImageLimits(), policy or FetchPolicy()
    policy = FetchPolicy(policy.allow_remote, min(policy.max_bytes, limits.max_bytes), policy.timeout)
    out = []
    for i, url in enumerate(urls):
        what = f"image {i + 1}"
        out.append(load_image(read_image_source(url, policy, what), spec, limits, what))
    return out
