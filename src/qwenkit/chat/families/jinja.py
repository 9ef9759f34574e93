"""The fallback for a chat template that matches no family: the checkpoint's own Jinja, in a sandbox.

Contract: JinjaTemplate(template) compiles the template in jinja2's ImmutableSandboxedEnvironment (with
transformers' tojson, raise_exception and strftime_now) and renders one probe conversation, so a template
that cannot be rendered at all fails at load with ChatTemplateError. render() gives the template the
messages as OpenAI dicts (inline <think> history split into reasoning_content) and stops output at
MAX_OUTPUT_CHARS. Markup tokens in caller text are escaped before rendering and restored after, so only
the template's own markup becomes Special parts (the injection guard holds here too). A request the template
refuses, or on which it fails, raises ChatInputError with the template's message. Output conventions
(think tags, tool format) come from the family the template resembles, else from its text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenkit.chat.families import _hermes, _xml
from qwenkit.chat.families.base import (
    MARKUP_TOKENS,
    Builder,
    ChatFamily,
    RenderedPrompt,
    check_continuable,
    check_inputs,
    refuse,
    split_reasoning,
)
from qwenkit.chat.messages import ChatInputError, Message, Tool
from qwenkit.tokenizer.specials import THINK_END, THINK_START

MAX_OUTPUT_CHARS = 8 * 1024 * 1024
_MARK = "\ufdd0"  # a Unicode noncharacter: never in real text, so escaping it is cheap
_UNMARK = re.compile(f"{_MARK}{_MARK}?")


class ChatTemplateError(ValueError):
    """A checkpoint's chat template that cannot be used at all (found at load, not at the first request)."""


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        value = value.replace(_MARK, _MARK + _MARK)
        for token in MARKUP_TOKENS:
            value = value.replace(token, token[0] + _MARK + token[1:])
        return value
    if isinstance(value, Mapping):
        return {_escape(k): _escape(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape(v) for v in value]
    return value


def _unescape(text: str) -> str:
    return _UNMARK.sub(lambda m: m.group(0)[1:], text)


def _template_dict(message: Message) -> dict[str, Any]:
    out = message.to_openai()
    if (
        message.role == "assistant"
        and message.reasoning_content is None
        and THINK_END in (message.content or "")
    ):
        out["reasoning_content"], out["content"] = split_reasoning(message)
    return out


class JinjaTemplate(ChatFamily):
    """A checkpoint's own chat template, rendered in a sandbox; `like` lends its output conventions."""

    name = "jinja"
    title = "the checkpoint's own Jinja template (sandboxed)"

    def __init__(self, template: str, like: ChatFamily | None = None) -> None:
        self.template = template
        self.like = like
        self.thinks = like.thinks if like else THINK_START in template
        self.tool_format = like.tool_format if like else ("xml" if _xml.XML_MARK in template else "hermes")
        self.reasoning_in_prompt = like.reasoning_in_prompt if like else _hermes.opens_think(template)
        self.soft_switches = like.soft_switches if like else False
        try:
            self._compiled = _environment().from_string(template)
        except TemplateError as exc:
            raise ChatTemplateError(f"the checkpoint's chat template does not compile: {exc}") from None
        try:
            self.render([Message(role="user", content="Hello")])
        except ChatInputError as exc:
            raise ChatTemplateError(
                f"the checkpoint's chat template cannot render a plain user message: {exc}"
            ) from None

    def resolve_thinking(self, messages: Sequence[Message], enable_thinking: bool | None) -> bool:
        if self.like is not None:
            return self.like.resolve_thinking(messages, enable_thinking)
        return self.thinks and enable_thinking is not False

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        enable_thinking: bool | None = None,
        preserve_thinking: bool | None = None,
        reasoning_effort: str | None = None,
    ) -> RenderedPrompt:
        check_inputs(messages, tools)
        if continue_final_message:
            check_continuable(messages, add_generation_prompt)
        variables: dict[str, Any] = {
            "messages": _escape([_template_dict(m) for m in messages]),
            "tools": _escape([t.root for t in tools]) if tools else None,
            "add_generation_prompt": add_generation_prompt,
        }
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        if preserve_thinking is not None:
            variables["preserve_thinking"] = preserve_thinking
        if reasoning_effort is not None:
            variables["reasoning_effort"] = reasoning_effort
        text = self._run(variables)
        if continue_final_message:
            # As transformers does: cut right after the final message's text.
            final = variables["messages"][-1].get("content") or ""
            at = text.rfind(final.strip()) if final.strip() else -1
            if at < 0:
                raise ChatInputError(
                    "continue_final_message: the chat template did not render the final message"
                )
            text = text[: at + len(final.strip())]
        out = Builder()
        for piece in re.split("(" + "|".join(re.escape(t) for t in MARKUP_TOKENS) + ")", text):
            if piece in MARKUP_TOKENS:
                out.special(piece)
            else:
                out.text(_unescape(piece))
        thinking = not continue_final_message and self.resolve_thinking(messages, enable_thinking)
        opened = add_generation_prompt and text.rstrip().endswith(THINK_START)
        return RenderedPrompt(
            parts=tuple(out.parts), thinking=thinking, think_opened=opened, family=self.name
        )

    def _run(self, variables: dict[str, Any]) -> str:
        pieces: list[str] = []
        size = 0
        try:
            for piece in self._compiled.generate(**variables):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise ChatInputError(
                        f"the model's chat template wrote more than {MAX_OUTPUT_CHARS} characters for this "
                        "request; shorten the conversation"
                    )
                pieces.append(piece)
        except _TemplateRaised as exc:
            raise refuse(str(exc)) from None
        except ChatInputError:
            raise
        except (
            TemplateError,
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            AttributeError,
            RecursionError,
        ) as exc:
            raise ChatInputError(
                f"the model's chat template failed on this request ({type(exc).__name__}: {exc})"
            ) from None
        return "".join(pieces)
