"""Training data: JSONL files of OpenAI chat examples or the seed's instruction/output pairs.

Contract: load_examples(path) reads every line before anything trains and returns a list of Example (chat
Messages, optional Tools, the 1-based line number). A line that is not a JSON object, has neither
`messages` nor `instruction`/`output`, holds a message the chat schema refuses, or has no assistant turn
raises TuneDataError naming the file and line, so a bad file never starts a run. Blank lines are skipped.
Chat lines: {"messages": [...], "tools": [...]?}; assistant reasoning comes from `reasoning_content` (or
`reasoning`) or inline <think>...</think> in content. Pair lines: {"instruction", "input"?, "output",
"system"?} become [system?, user(instruction + "\n\n" + input), assistant(output)].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenkit.chat.messages import ChatInputError, Message, Tool, messages_from_openai, tools_from_openai


class TuneDataError(ValueError):
    """A training file that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Example:
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    line: int = 0

    @property
    def has_reasoning(self) -> bool:
        """Whether any assistant turn carries reasoning (reasoning_content or an inline think block)."""
        return any(
            m.role == "assistant" and (bool(m.reasoning_content) or "</think>" in (m.content or ""))
            for m in self.messages
        )


def _pair_messages(obj: dict[str, Any], where: str) -> list[dict[str, Any]]:
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise TuneDataError(f"{where}: '{key}' must be a string")
    prompt = obj["instruction"]
    extra = obj.get("input")
    if isinstance(extra, str) and extra:
        prompt = f"{prompt}\n\n{extra}"
    messages: list[dict[str, Any]] = []
    if isinstance(obj.get("system"), str):
        messages.append({"role": "system", "content": obj["system"]})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
    return messages


def parse_example(line: str, where: str, number: int = 0) -> Example:
    """One JSONL line as an Example; TuneDataError (prefixed with where) when it cannot be trained on."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise TuneDataError(f"{where}: not valid JSON ({exc.args[0].split(':')[0]})") from None
    if not isinstance(obj, dict):
        raise TuneDataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise TuneDataError(f"{where}: 'messages' must be a non-empty list of messages")
    elif "instruction" in obj or "output" in obj:
        raw = _pair_messages(obj, where)
    else:
        raise TuneDataError(
            f"{where}: no 'messages' (OpenAI chat) and no 'instruction'/'output' pair; give one of them"
        )
    try:
        messages = messages_from_openai(raw)
        tools = tools_from_openai(obj.get("tools") or [])
    except ChatInputError as exc:
        raise TuneDataError(f"{where}: {exc}") from None
    if not any(m.role == "assistant" for m in messages):
        raise TuneDataError(f"{where}: the conversation has no assistant turn, so nothing to learn from it")
    return Example(tuple(messages), tuple(tools), number)


def load_examples(path: Path) -> list[Example]:
    """Every example in a JSONL file, validated up front (see the module docstring)."""
    if not path.is_file():
        raise TuneDataError(f"{path}: no such data file; pass a JSONL file with --data")
    examples: list[Example] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TuneDataError(f"{path}:{number}: not UTF-8 text; save the file as UTF-8") from None
            if line.strip():
                examples.append(parse_example(line, f"{path}:{number}", number))
    if not examples:
        raise TuneDataError(f"{path}: no examples (the file is empty); give one JSON object per line")
    return examples
