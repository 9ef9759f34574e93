"""Sampling parameters: one validated, immutable type shared by every engine and the server.

Contract: SamplingParams is a frozen pydantic model; out-of-range values and unknown fields raise
pydantic's ValidationError (a ValueError) naming the field. top_k=-1 means "off"; 0 is accepted as
"off" too and stored as -1. resolve_sampling() fills unspecified fields with Qwen's recommended
defaults for the mode and reports (as warnings, not errors) settings it had to override, such as
greedy decoding in thinking mode. Its own errors are SamplingError with a one-line message.
vLLM's extras: min_tokens (end-of-generation and stop token ids are suppressed until that many tokens
were generated), logit_bias (token id -> added to its logit, at most MAX_LOGIT_BIAS entries; ids are
checked against the vocabulary by the engine), include_stop_str_in_output, skip_special_tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
TOP_K_OFF = -1
MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias
LOGIT_BIAS_LIMIT = 100.0  # |bias| at most, as in OpenAI's API

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0)]
Bias = Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]


class SamplingError(ValueError):
    """Bad sampling parameters; the message is one line naming the field and the allowed range."""


class SamplingParams(BaseModel):
    """How to pick each next token. Strict types: numbers must be numbers, seed an int."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=TOP_K_OFF, ge=-1, description="-1 (or 0) = off")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0, description="1 = off")
    seed: int | None = None
    stop: tuple[StopString, ...] = Field(default=(), max_length=MAX_STOP_SEQUENCES)
    max_tokens: int | None = Field(default=None, ge=1, description="None = up to the context length")
    thinking_budget: int | None = Field(default=None, ge=1, description="max tokens inside <think>")
    min_tokens: int = Field(default=0, ge=0, description="no end-of-generation or stop token before this")
    logit_bias: dict[TokenId, Bias] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = Field(default=True, description="False: control tokens' text is kept")

    def __hash__(self) -> int:
        # Frozen, but logit_bias is a dict: hash its items instead.
        values = tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in self.__dict__.values())
        return hash(values)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        # OpenAI clients send either one string or a list; strict mode would refuse the list otherwise.
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_keys_as_ints(cls, value: Any) -> Any:
        # JSON object keys are strings ("50256": -100); strict mode would refuse them as token ids.
        if isinstance(value, dict):
            if len(value) > MAX_LOGIT_BIAS:  # before validating every entry of a huge one
                raise ValueError(f"at most {MAX_LOGIT_BIAS} entries (got {len(value)})")
            return {_int_key(k): v for k, v in value.items()}
        return value

    @field_validator("min_tokens", mode="after")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"must be at most max_tokens ({max_tokens})")
        return value

    @field_validator("top_k", mode="after")
    @classmethod
    def _top_k_off(cls, value: int) -> int:
        # Both conventions for "off" exist (vLLM: -1, transformers: 0); store one.
        return TOP_K_OFF if value == 0 else value

    @classmethod
    def recommended(cls, thinking: bool) -> SamplingParams:
        """Qwen's recommendation: thinking T=0.6, top_p=0.95; non-thinking T=0.7, top_p=0.8; top_k=20."""
        return cls(**_recommended_fields(thinking))


def _int_key(key: Any) -> Any:
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return key


def _recommended_fields(thinking: bool) -> dict[str, Any]:
    if thinking:
        return {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
    return {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


def _one_line(error: ValidationError) -> str:
    """The first problem of a ValidationError as `field: message (got value)`."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "sampling parameters"
    got = repr(first.get("input"))
    if len(got) > 80:  # a 1,000-entry logit_bias must not fill the message
        got = got[:77] + "..."
    return f"{field}: {first['msg']} (got {got})"


def resolve_sampling(user: Mapping[str, object], thinking: bool) -> tuple[SamplingParams, list[str]]:
    """The parameters to use for a request: the user's values over the mode's recommended defaults.

    Keys whose value is None count as unspecified (clients send explicit nulls). Greedy decoding
    (temperature 0) in thinking mode loops endlessly, so it is replaced by the thinking defaults
    for temperature/top_p/top_k and a warning says so.
    """
    unknown = sorted(set(user) - set(SamplingParams.model_fields))
    if unknown:
        allowed = ", ".join(SamplingParams.model_fields)
        raise SamplingError(f"unknown sampling parameter {unknown[0]!r}: use one of {allowed}")
    given = {key: value for key, value in user.items() if value is not None}
    fields = {**_recommended_fields(thinking), **given}
    warnings: list[str] = []
    temperature = given.get("temperature")
    greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    if thinking and greedy:
        defaults = _recommended_fields(True)
        for key in ("temperature", "top_p", "top_k"):
            fields[key] = defaults[key]
        warnings.append(
            "greedy decoding (temperature=0) is not allowed in thinking mode because it repeats endlessly; "
            f"using temperature={defaults['temperature']}, top_p={defaults['top_p']}, "
            f"top_k={defaults['top_k']}"
            " (turn thinking off for greedy output)"
        )
    try:
        return SamplingParams(**fields), warnings
    except ValidationError as error:
        raise SamplingError(_one_line(error)) from None
