"""SamplingParams ranges, errors and Qwen's recommended defaults; resolve_sampling's merge and warnings."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from qwenkit.engines.sampling import MAX_LOGIT_BIAS, SamplingError, SamplingParams, resolve_sampling


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


# ---- vLLM's extras: min_tokens, logit_bias, include_stop_str_in_output, skip_special_tokens ----------


def test_extras_have_vllm_defaults() -> None:
    params = SamplingParams()
    assert params.min_tokens == 0 and params.logit_bias == {}
    assert params.include_stop_str_in_output is False and params.skip_special_tokens is True


def test_logit_bias_takes_json_string_keys_and_int_values() -> None:
    params = SamplingParams(logit_bias={"50256": -100, 7: 2.5, " 9": 100})
    assert params.logit_bias == {50256: -100.0, 7: 2.5, 9: 100.0}
    assert SamplingParams(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS)}).logit_bias[0] == 1.0


@pytest.mark.parametrize(
    ("bias", "where"),
    [
        ({"abc": 1}, "logit_bias.abc"),
        ({"-1": 1}, "logit_bias.-1"),
        ({5: 100.5}, "logit_bias.5"),
        ({5: -101}, "logit_bias.5"),
        ({5: True}, "logit_bias.5"),
        ({5: "1"}, "logit_bias.5"),
        ([5], "logit_bias"),
    ],
)
def test_bad_logit_bias_names_the_entry(bias: object, where: str) -> None:
    with pytest.raises(SamplingError) as info:
        resolve_sampling({"logit_bias": bias}, thinking=False)
    assert re.match(re.escape(where) + r"(\.\[key\])?:", str(info.value)) and "\n" not in str(info.value)


def test_logit_bias_size_is_capped_with_a_short_message() -> None:
    with pytest.raises(SamplingError) as info:
        resolve_sampling({"logit_bias": {i: 1 for i in range(MAX_LOGIT_BIAS + 1)}}, thinking=False)
    message = str(info.value)
    assert message.startswith("logit_bias:") and f"at most {MAX_LOGIT_BIAS}" in message
    assert len(message) < 300


def test_min_tokens_range_and_at_most_max_tokens() -> None:
    assert SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5
    assert SamplingParams(min_tokens=50).min_tokens == 50  # no max_tokens: up to the context
    for bad in ({"min_tokens": -1}, {"min_tokens": 6, "max_tokens": 5}, {"min_tokens": 1.0}):
        with pytest.raises(SamplingError, match=r"^min_tokens:"):
            resolve_sampling(bad, thinking=False)


@pytest.mark.parametrize("field", ["include_stop_str_in_output", "skip_special_tokens"])
def test_flags_are_strict_booleans(field: str) -> None:
    assert getattr(resolve_sampling({field: True}, thinking=False)[0], field) is True
    assert getattr(resolve_sampling({field: False}, thinking=False)[0], field) is False
    with pytest.raises(SamplingError, match=f"^{field}:"):
        resolve_sampling({field: 1}, thinking=False)


def test_resolve_accepts_the_extras_and_none_means_default() -> None:
    user = {
        "min_tokens": 2,
        "logit_bias": {"11": -5},
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
    }
    params, warnings = resolve_sampling(user, thinking=False)
    assert (params.min_tokens, params.logit_bias) == (2, {11: -5.0}) and warnings == []
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    nulls = dict.fromkeys(user)
    assert resolve_sampling(nulls, thinking=False)[0] == SamplingParams.recommended(False)


def test_params_with_logit_bias_stay_hashable_and_round_trip() -> None:
    a = SamplingParams(logit_bias={3: 1.0, 1: -2.0})
    assert hash(a) == hash(SamplingParams(logit_bias={1: -2.0, 3: 1.0}))
    assert hash(a) != hash(SamplingParams(logit_bias={1: -2.0}))
    assert SamplingParams.model_validate_json(a.model_dump_json()) == a
