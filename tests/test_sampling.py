"""SamplingParams ranges, errors and Qwen's recommended defaults; resolve_sampling's merge and warnings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qwenkit.engines.sampling import SamplingError, SamplingParams, resolve_sampling


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.0),
        ("temperature", 2.0),
        ("top_p", 1.0),
        ("top_p", 1e-6),
        ("top_k", 1),
        ("top_k", 200),
        ("min_p", 0.0),
        ("min_p", 1.0),
        ("presence_penalty", -2.0),
        ("presence_penalty", 2.0),
        ("frequency_penalty", -2.0),
        ("frequency_penalty", 2.0),
        ("repetition_penalty", 2.0),
        ("repetition_penalty", 0.5),
        ("seed", 0),
        ("seed", -7),
        ("max_tokens", 1),
        ("thinking_budget", 1),
    ],
)
def test_values_in_range_are_kept(field: str, value: object) -> None:
    assert getattr(SamplingParams(**{field: value}), field) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 2.01),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.1),
        ("max_tokens", 0),
        ("thinking_budget", 0),
        ("seed", 1.5),
        ("temperature", "0.7"),
        ("temperature", True),
        ("max_tokens", 10.0),
    ],
)
def test_values_out_of_range_or_of_wrong_type_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_top_k_zero_means_off_like_minus_one() -> None:
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(top_k=0) == SamplingParams(top_k=-1)


def test_stop_accepts_one_string_or_a_list() -> None:
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().stop == ()
    assert SamplingParams(stop=["x"] * 16).stop == ("x",) * 16


@pytest.mark.parametrize("stop", [[""], ["x" * 257], ["x"] * 17, [1]])
def test_bad_stop_sequences_are_refused(stop: list[object]) -> None:
    with pytest.raises(ValidationError) as info:
        SamplingParams(stop=stop)
    assert info.value.errors()[0]["loc"][0] == "stop"


def test_stop_sequence_of_256_chars_is_allowed() -> None:
    assert SamplingParams(stop="y" * 256).stop == ("y" * 256,)


def test_extra_fields_are_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="best_of"):
        SamplingParams(best_of=2)


def test_params_are_frozen_and_hashable() -> None:
    params = SamplingParams(temperature=0.5, stop=["a"])
    with pytest.raises(ValidationError):
        params.temperature = 0.9  # type: ignore[misc]
    assert hash(params) == hash(SamplingParams(temperature=0.5, stop="a"))


def test_json_round_trip() -> None:
    params = SamplingParams(temperature=0.3, top_k=5, stop=["\n\n"], seed=3, max_tokens=9)
    assert SamplingParams.model_validate_json(params.model_dump_json()) == params


def test_recommended_defaults_follow_qwen() -> None:
    thinking = SamplingParams.recommended(thinking=True)
    assert (thinking.temperature, thinking.top_p, thinking.top_k, thinking.min_p) == (0.6, 0.95, 20, 0.0)
    plain = SamplingParams.recommended(thinking=False)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p) == (0.7, 0.8, 20, 0.0)


@pytest.mark.parametrize("thinking", [True, False])
def test_resolve_with_nothing_given_is_the_recommendation(thinking: bool) -> None:
    params, warnings = resolve_sampling({}, thinking)
    assert params == SamplingParams.recommended(thinking)
    assert warnings == []


def test_resolve_keeps_user_values_and_fills_the_rest() -> None:
    params, warnings = resolve_sampling({"temperature": 1.1, "max_tokens": 50, "stop": "###"}, thinking=False)
    assert params.temperature == 1.1
    assert params.max_tokens == 50
    assert params.stop == ("###",)
    assert (params.top_p, params.top_k) == (0.8, 20)
    assert warnings == []


def test_resolve_treats_none_as_unspecified() -> None:
    params, _ = resolve_sampling({"temperature": None, "top_p": None, "seed": None}, thinking=True)
    assert params == SamplingParams.recommended(True)


def test_greedy_is_allowed_without_thinking() -> None:
    params, warnings = resolve_sampling({"temperature": 0}, thinking=False)
    assert params.temperature == 0.0
    assert warnings == []


def test_greedy_in_thinking_mode_warns_and_uses_thinking_defaults() -> None:
    params, warnings = resolve_sampling(
        {"temperature": 0.0, "top_p": 0.5, "top_k": 1, "max_tokens": 7}, thinking=True
    )
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
    assert params.max_tokens == 7
    assert len(warnings) == 1
    assert "temperature=0" in warnings[0]
    assert "thinking" in warnings[0]


def test_resolve_errors_are_one_line_and_name_the_field() -> None:
    with pytest.raises(SamplingError) as info:
        resolve_sampling({"top_p": 3}, thinking=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("top_p:")
    assert isinstance(info.value, ValueError)


def test_resolve_refuses_unknown_keys_listing_the_supported_ones() -> None:
    with pytest.raises(SamplingError, match=r"unknown sampling parameter 'n'.*temperature"):
        resolve_sampling({"n": 2}, thinking=False)


def test_resolve_does_not_mistake_false_for_greedy() -> None:
    with pytest.raises(SamplingError, match="temperature"):
        resolve_sampling({"temperature": False}, thinking=True)
