"""ServeConfig: every knob of `qwenkit serve` that is not the engine's, validated and immutable.

Contract: the defaults are the secure ones (loopback only, caps on every request dimension and on how long
a client may take to send one, no CORS, no trusted proxy); a cap of None means "bounded by the context" where
that is the natural limit. API keys are SecretStr, so they never show in a repr or a log line. CORS origins
and proxy networks are checked here, so a bad one fails at startup with its name.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from qwenkit.engines.sampling import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from qwenkit.media.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES
from qwenkit.serve.security import parse_networks


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0 = any free port")
    api_keys: tuple[SecretStr, ...] = Field(default=(), description="empty = no authentication")
    served_model_name: str | None = Field(default=None, min_length=1, max_length=256)
    rate_limit_rpm: int | None = Field(default=None, ge=1, description="requests/minute per key or client")
    rate_limit_tpm: int | None = Field(default=None, ge=1, description="tokens/minute per key or client")
    auth_failures_per_minute: int = Field(
        default=30, ge=1, description="wrong API keys an address may send per minute before it gets 429s"
    )
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    max_messages: int = Field(default=512, ge=1)
    max_tools: int = Field(default=128, ge=0)
    max_tool_bytes: int = Field(default=32 * 1024, ge=256, description="one tool definition as JSON")
    max_n: int = Field(default=8, ge=1, description="choices (n × prompts) per request")
    max_top_logprobs: int = Field(default=20, ge=0, le=20)
    max_stop: int = Field(default=MAX_STOP_SEQUENCES, ge=0, le=MAX_STOP_SEQUENCES)
    max_stop_chars: int = Field(default=MAX_STOP_CHARS, ge=1, le=MAX_STOP_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, description="largest max_tokens; None = the context")
    responses_store: int = Field(
        default=0, ge=0, description="/v1/responses kept for previous_response_id (LRU, per key); 0 = off"
    )
    log_content: bool = Field(default=False, description="log prompt and completion text")
    shutdown_timeout: float = Field(default=30.0, ge=0, description="seconds in-flight requests may finish")
    header_timeout: float = Field(
        default=10.0, gt=0, description="seconds a connection may take to send a request's headers"
    )
    body_timeout: float = Field(default=30.0, gt=0, description="seconds a request may take to send its body")
    max_connections_per_address: int = Field(
        default=64, ge=1, description="open connections one client address may hold (proxies exempt)"
    )
    cors_origins: tuple[str, ...] = Field(
        default=(), description="origins allowed to call from a browser ('*': any); empty = no CORS"
    )
    trusted_proxies: tuple[str, ...] = Field(
        default=(), description="networks whose X-Forwarded-For header names the client"
    )
    presets_file: str | None = Field(
        default=None, description="a YAML file of prompt presets added to the built-in ones (`preset` field)"
    )
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, ge=1024, description="one image, encoded")
    max_image_pixels: int = Field(default=DEFAULT_MAX_IMAGE_PIXELS, ge=64, description="one image, decoded")
    max_images: int = Field(default=DEFAULT_MAX_IMAGES, ge=0, description="images per request")
    allow_remote_media: bool = Field(
        default=False, description="fetch http(s) image URLs (public addresses only); off: data: URLs only"
    )
    batch_dir: str | None = Field(
        default=None, description="where /v1/files and /v1/batches keep their data; None = <cache>/batches"
    )
    max_batch_file_bytes: int = Field(default=100 * 2**20, ge=1024, description="largest /v1/files upload")
    batch_storage_bytes: int = Field(
        default=2**30, ge=1024, description="bytes of files one API key may keep (batch outputs included)"
    )
    batch_max_requests: int = Field(default=50_000, ge=1, description="requests in one batch file")
    batch_concurrency: int = Field(
        default=4, ge=1, description="batch requests on the engine at once; the other slots stay interactive"
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            parts = urlsplit(origin)
            exact = (
                parts.scheme in ("http", "https")
                and parts.netloc
                and origin == f"{parts.scheme}://{parts.netloc}"
            )
            if origin != "*" and not exact:
                raise ValueError(
                    f"CORS origin {origin!r}: write it as scheme://host[:port] (no path), or '*'"
                )
        return origins

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, proxies: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(net) for net in parse_networks(proxies))

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
