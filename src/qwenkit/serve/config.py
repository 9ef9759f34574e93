"""ServeConfig: every knob of `qwenkit serve` that is not the engine's, validated and immutable.

Contract: the defaults are the secure ones (loopback only, caps on every request dimension); a cap of None
means "bounded by the context" where that is the natural limit. API keys are SecretStr, so they never show
in a repr or a log line.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from qwenkit.engines.sampling import MAX_STOP_CHARS, MAX_STOP_SEQUENCES


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
    log_content: bool = Field(default=False, description="log prompt and completion text")
    shutdown_timeout: float = Field(default=30.0, ge=0, description="seconds in-flight requests may finish")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
