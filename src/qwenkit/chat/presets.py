"""Prompt presets: a named system prompt with sampling defaults (built-in reasoning, coding and multilingual,
and users' own from a YAML file), applied to a chat request before it is rendered.

Contract: `apply_preset(preset, messages, sampling, args)` returns new messages whose first message is the
system message with the preset's prompt (a request's own system message follows it in the same message,
since Qwen templates take one system message, first) and the sampling fields the request left unset
(None or absent) filled from the preset; the request's own values always win. Prompts are plain text with
`{name}` fields filled from args (missing or unknown args are PresetError naming them); nothing here builds
`<|im_start|>` strings: the normal renderer turns the messages into tokens, so injection protection holds.
`load_presets(path)` reads `presets: {name: {system, sampling?, enable_thinking?, args?}}` and raises
PresetError with the file, line and reason for YAML that does not parse or does not fit. The server's
wiring (a "preset" extra body field) and the CLI's --preset / --presets are not here.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qwenkit.engines.sampling import SamplingParams

MAX_PRESETS_BYTES = 1_000_000


class PresetError(ValueError):
    """A preset that does not exist, a presets file that does not fit, or missing arguments; one line."""


@dataclass(frozen=True)
class Preset:
    name: str
    system: str  # may hold {arg} fields
    sampling: Mapping[str, Any] = field(default_factory=dict)
    enable_thinking: bool | None = None
    defaults: Mapping[str, str] = field(default_factory=dict)  # values for args a request leaves out

    @property
    def args(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(self.system) if f))

    def prompt(self, args: Mapping[str, Any] | None = None) -> str:
        """The system prompt with its fields filled (lists are joined with ", ")."""
        given = {**self.defaults, **{k: v for k, v in (args or {}).items() if v is not None}}
        unknown = sorted(set(given) - set(self.args))
        if unknown:
            raise PresetError(
                f"preset {self.name!r} takes no argument {unknown[0]!r}: it takes {_names(self.args)}"
            )
        missing = [a for a in self.args if a not in given]
        if missing:
            raise PresetError(f"preset {self.name!r} needs the argument {missing[0]!r}")
        values = {
            k: ", ".join(map(str, v)) if isinstance(v, list | tuple) else str(v) for k, v in given.items()
        }
        return self.system.format_map(values)


def _names(args: Sequence[str]) -> str:
    return ", ".join(repr(a) for a in args) or "none"


# The chapter's three: Qwen's recommended sampling for each mode (thinking vs. instruct / coder).
BUILTIN: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "reasoning",
            "You are a careful reasoner. Work through the problem step by step, check each step, and say "
            "when something is uncertain. End with the final answer on its own line.",
            {"temperature": 0.6, "top_p": 0.95, "top_k": 20},
            enable_thinking=True,
        ),
        Preset(
            "coding",
            "You are an expert {language} programmer. Write correct, idiomatic {language} with clear "
            "names, handle errors and edge cases, and explain briefly what the code does. "
            "Constraints: {constraints}.",
            {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
            defaults={"language": "Python", "constraints": "none beyond the request"},
        ),
        Preset(
            "multilingual",
            "You are a multilingual assistant. Answer in each of these languages, in this order, under a "
            "heading with the language's name: {languages}. Keep the meaning the same in every language.",
            {"temperature": 0.7, "top_p": 0.8, "top_k": 20},
            enable_thinking=False,
        ),
    )
}


def preset_card(preset: Preset) -> dict[str, Any]:
    """What a client needs to offer a preset: its name, arguments (with defaults), sampling and thinking."""
    return {
        "id": preset.name,
        "object": "preset",
        "args": list(preset.args),
        "defaults": dict(preset.defaults),
        "sampling": dict(preset.sampling),
        "enable_thinking": preset.enable_thinking,
    }


def find_preset(name: str, presets: Mapping[str, Preset] | None = None) -> Preset:
    """The preset called `name` among `presets` (default: the built-in ones)."""
    presets = BUILTIN if presets is None else presets
    if name not in presets:
        raise PresetError(f"no preset {name!r}: use one of {_names(sorted(presets))}")
    return presets[name]


def apply_preset(
    preset: Preset,
    messages: Sequence[Mapping[str, Any]],
    sampling: Mapping[str, Any] | None = None,
    args: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, sampling) with the preset applied; the inputs are not changed."""
    prompt = preset.prompt(args)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") in ("system", "developer"):
        own = out[0].get("content")
        if isinstance(own, str):
            out[0]["content"] = f"{prompt}\n\n{own}" if own.strip() else prompt
        else:  # content parts: the preset's text goes first, as a text part
            out[0]["content"] = [{"type": "text", "text": prompt}, *(own or [])]
    else:
        out.insert(0, {"role": "system", "content": prompt})
    merged = dict(sampling or {})
    for key, value in preset.sampling.items():
        if merged.get(key) is None:
            merged[key] = value
    return out, merged


def _line(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}" if mark is not None else "somewhere"


def load_presets(path: Path) -> dict[str, Preset]:
    """The built-in presets plus the file's (a file's preset of the same name replaces the built-in one)."""
    try:
        if path.stat().st_size > MAX_PRESETS_BYTES:
            raise PresetError(f"{path} is over {MAX_PRESETS_BYTES // 1000} kB: is it the right file?")
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PresetError(f"cannot read presets file {path}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise PresetError(f"{path}, {_line(error)}: not valid YAML ({reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("presets"), dict) or set(data) != {"presets"}:
        raise PresetError(f"{path}: expected one top-level key 'presets' mapping names to presets")
    lines = _key_lines(text)
    presets = dict(BUILTIN)
    for name, spec in data["presets"].items():
        where = f"{path}, line {lines.get(str(name), '?')}"
        presets[str(name)] = _preset(str(name), spec, where)
    return presets


def _key_lines(text: str) -> dict[str, int]:
    """Line numbers of the presets' names (for errors about a preset that parsed but does not fit)."""
    node = yaml.compose(text)
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == "presets" and isinstance(value, yaml.MappingNode):
                for name, _ in value.value:
                    lines[str(name.value)] = name.start_mark.line + 1
    return lines


_FIELDS = {"system", "sampling", "enable_thinking", "defaults"}


def _preset(name: str, spec: Any, where: str) -> Preset:
    if not isinstance(spec, dict):
        raise PresetError(f"{where}: preset {name!r} must be a mapping with at least 'system'")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise PresetError(
            f"{where}: preset {name!r} has unknown key {unknown[0]!r}; use {_names(sorted(_FIELDS))}"
        )
    system = spec.get("system")
    if not isinstance(system, str) or not system.strip():
        raise PresetError(f"{where}: preset {name!r} needs a non-empty 'system' prompt")
    try:
        list(string.Formatter().parse(system))
    except ValueError as error:
        raise PresetError(
            f"{where}: preset {name!r}: {error} (write a literal brace as {{{{ or }}}})"
        ) from None
    sampling = spec.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise PresetError(f"{where}: preset {name!r}: 'sampling' must be a mapping")
    try:
        SamplingParams(**sampling)
    except (ValidationError, TypeError) as error:
        first = error.errors()[0] if isinstance(error, ValidationError) else {"loc": (), "msg": str(error)}
        field_name = ".".join(map(str, first["loc"])) or "sampling"
        raise PresetError(f"{where}: preset {name!r}: sampling {field_name}: {first['msg']}") from None
    thinking = spec.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise PresetError(f"{where}: preset {name!r}: 'enable_thinking' must be true or false")
    defaults = spec.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PresetError(f"{where}: preset {name!r}: 'defaults' must map argument names to text")
    preset = Preset(name, system, dict(sampling), thinking, {str(k): str(v) for k, v in defaults.items()})
    extra = sorted(set(preset.defaults) - set(preset.args))
    if extra:
        raise PresetError(
            f"{where}: preset {name!r} has a default for {extra[0]!r}, which its prompt never uses"
        )
    return preset
