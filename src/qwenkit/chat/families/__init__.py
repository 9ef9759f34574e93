"""Chat-template families: one module per family, chosen from the checkpoint's own chat template.

Contract: FAMILIES lists the known families (Qwen3.5+, Qwen3-Coder, QwQ, Qwen3-2507 Thinking, Qwen3 hybrid,
Qwen3-2507 Instruct, Qwen2.5); at most one detects any template. choose_family(template, model_type) picks
the family whose detector matches the template and whose renderer gives the same text as the template on
a probe corpus; a template that matches none (or renders differently, or reads a variable no family
implements: TEMPLATE_ONLY_VARIABLES) is rendered by its own Jinja in a sandbox (JinjaTemplate, with a
warning); with no template at all, model_type decides (a warning says so).
as_family() accepts a family, its name, or a legacy Flavor, so older call sites keep working.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from qwenkit.chat.families import qwen2_5, qwen3, qwen3_5, qwen3_coder, qwen3_instruct_2507, qwen3_thinking
from qwenkit.chat.families.base import ChatFamily, RenderedPrompt
from qwenkit.chat.families.jinja import ChatTemplateError, JinjaTemplate
from qwenkit.chat.flavor import Flavor
from qwenkit.chat.messages import ChatInputError, Message, Tool, ToolCall

log = logging.getLogger(__name__)

QWEN2_5 = qwen2_5.FAMILY
QWEN3 = qwen3.FAMILY
QWEN3_INSTRUCT_2507 = qwen3_instruct_2507.FAMILY
QWEN3_THINKING_2507 = qwen3_thinking.QWEN3_THINKING_2507
QWQ = qwen3_thinking.QWQ
QWEN3_CODER = qwen3_coder.FAMILY
QWEN3_5 = qwen3_5.FAMILY

FAMILIES: tuple[ChatFamily, ...] = (
    QWEN3_5,
    QWEN3_CODER,
    QWQ,
    QWEN3_THINKING_2507,
    QWEN3,
    QWEN3_INSTRUCT_2507,
    QWEN2_5,
)
FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
FamilyLike = ChatFamily | Flavor | str


def family_by_name(name: str) -> ChatFamily:
    """The family called name (e.g. "qwen3_5"); ValueError naming the known ones otherwise."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown chat family {name!r}: use one of {', '.join(FAMILY_NAMES)}")


def as_family(value: FamilyLike) -> ChatFamily:
    """A family from a family, its name, or a legacy Flavor (QWEN3 → qwen3, QWEN2_5 → qwen2_5)."""
    if isinstance(value, ChatFamily):
        return value
    try:
        return family_by_name(str(value.value if isinstance(value, Flavor) else value))
    except ValueError as exc:
        raise ChatInputError(str(exc)) from None


def detect_family(template: str) -> ChatFamily | None:
    """The family whose detector recognises this chat template text, or None."""
    found = [f for f in FAMILIES if f.detect(template)]
    return found[0] if found else None


SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe")


def family_for_model_type(model_type: str) -> ChatFamily:
    """The fallback for a checkpoint without a chat template: the family its model_type/GGUF arch implies."""
    kind = model_type.lower()
    if kind.startswith(("qwen3_5", "qwen35")):
        return QWEN3_5
    if kind.startswith("qwen3"):
        return QWEN3
    if kind.startswith("qwen2"):
        return QWEN2_5
    raise ValueError(
        f"not a Qwen text model type: {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    )


_PROBE_TOOL = Tool(
    {
        "type": "function",
        "function": {
            "name": "probe",
            "description": "A probe.",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }
)
_PROBES: tuple[tuple[list[Message], list[Tool] | None], ...] = (
    ([Message(role="user", content="Hello")], None),
    (
        [
            Message(role="system", content="Be brief."),
            Message(role="user", content="Hi"),
            Message(role="assistant", content="Hello!"),
            Message(role="user", content="Look it up."),
            Message(role="assistant", content="", tool_calls=[ToolCall(name="probe", arguments={"q": "x"})]),
            Message(role="tool", content="found"),
        ],
        [_PROBE_TOOL],
    ),
)


# Variables of newer templates (Qwen3.8's reasoning_effort) that no family's renderer implements: a template
# reading one is rendered by its own Jinja, so the variable takes effect.
TEMPLATE_ONLY_VARIABLES = ("reasoning_effort",)


def _same_as_template(family: ChatFamily, own: JinjaTemplate) -> bool:
    for messages, tools in _PROBES:
        # enable_thinking given, as llama.cpp gives it: its QwQ copy closes the block when it is undefined.
        for kwargs in ({"enable_thinking": True},):
            try:
                ours = family.render(messages, tools, **kwargs).text
                theirs = own.render(messages, tools, **kwargs).text
            except ChatInputError:
                return False
            if ours != theirs:
                return False
    return True


def choose_family(template: str | None, model_type: str | None = None) -> tuple[ChatFamily, list[str]]:
    """The family that renders this checkpoint's prompts, and warnings to show the user.

    Raises ChatTemplateError when the template cannot be compiled or rendered at all.
    """
    if not template:
        family = family_for_model_type(model_type or "qwen3")
        return family, [
            f"the checkpoint has no chat template: using the {family.name} family its model type implies"
        ]
    own = JinjaTemplate(template)
    detected = detect_family(template)
    extra = sorted(v for v in TEMPLATE_ONLY_VARIABLES if v in template)
    if detected is not None and not extra and _same_as_template(detected, own):
        return detected, []
    own = JinjaTemplate(template, like=detected)
    if detected is not None and extra:
        why = f"it reads {', '.join(extra)}, which qwenkit's {detected.name} renderer does not implement"
    elif detected is not None:
        why = f"it looks like {detected.name} but renders differently"
    else:
        why = "it matches no known family"
    warning = f"the checkpoint's chat template is rendered by its own Jinja in a sandbox: {why}"
    log.warning(warning)
    return own, [warning]


def template_from_dir(path: Path) -> str | None:
    """A checkpoint directory's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text("utf-8")
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        data: Any = json.loads(config.read_text("utf-8"))
    except ValueError:
        return None
    value = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "ChatFamily",
    "ChatTemplateError",
    "FamilyLike",
    "JinjaTemplate",
    "RenderedPrompt",
    "as_family",
    "choose_family",
    "detect_family",
    "family_by_name",
    "family_for_model_type",
    "template_from_dir",
]
