"""`qwenkit render`: print the exact prompt and token ids a conversation becomes, and the chat family used.

The family comes from the checkpoint's own chat template (model_type only when it has none); --family
overrides it. --json prints {prompt, token_ids, num_tokens, thinking, family, warnings}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from qwenkit.chat.families import FAMILY_NAMES, as_family, choose_family, template_from_dir
from qwenkit.chat.messages import messages_from_openai, tools_from_openai
from qwenkit.chat.render import render
from qwenkit.cli.common import AllowPickleOption, ModelOption, load_model
from qwenkit.cli.errors import friendly_errors
from qwenkit.tokenizer.tokenizer import QwenTokenizer


def _read_json(path: Path) -> Any:
    text = sys.stdin.read() if str(path) == "-" else path.read_text("utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _conversation(
    messages_file: Path | None, tools_file: Path | None, system: str | None, user: list[str] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    tools: list[dict[str, Any]] | None = None
    messages: list[dict[str, Any]] = []
    if messages_file is not None:
        data = _read_json(messages_file)
        if isinstance(data, dict):
            messages = list(data.get("messages", []))
            tools = data.get("tools")
        elif isinstance(data, list):
            messages = data
        else:
            raise ValueError(f"{messages_file}: expected a list of messages or an object with 'messages'")
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    for text in user or []:
        messages.append({"role": "user", "content": text})
    if tools_file is not None:
        loaded = _read_json(tools_file)
        tools = loaded if isinstance(loaded, list) else [loaded]
    if not messages:
        raise ValueError("no messages: pass --user TEXT or --messages FILE")
    return messages, tools


@friendly_errors
def render_command(
    model: ModelOption = None,
    user: Annotated[
        list[str] | None, typer.Option("--user", "-u", help="A user message (repeatable).")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system message.")] = None,
    messages: Annotated[
        Path | None, typer.Option(help="JSON file (or - for stdin): a message list or {messages, tools}.")
    ] = None,
    tools: Annotated[Path | None, typer.Option(help="JSON file with OpenAI-style tool definitions.")] = None,
    think: Annotated[
        bool | None,
        typer.Option("--think/--no-think", help="enable_thinking; default: soft switches, else on."),
    ] = None,
    generation_prompt: Annotated[bool, typer.Option(help="End with the assistant generation prompt.")] = True,
    family: Annotated[
        str | None,
        typer.Option(
            "--family",
            "--flavor",
            help=f"Override the chat family the checkpoint's template implies ({', '.join(FAMILY_NAMES)}).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Print the exact prompt and token ids a conversation becomes."""
    conv, tool_defs = _conversation(messages, tools, system, user)
    resolved = load_model(model, allow_pickle)
    if resolved.kind != "hf":
        raise ValueError("render reads the tokenizer from a checkpoint directory; pass a directory or hub id")
    tokenizer = QwenTokenizer.from_dir(resolved.path)
    warnings: list[str] = []
    if family is not None:
        chosen = as_family(family)
    else:
        chosen, warnings = choose_family(template_from_dir(resolved.path), resolved.model_type or "qwen3")
    prompt = render(
        messages_from_openai(conv),
        tools_from_openai(tool_defs) if tool_defs else None,
        add_generation_prompt=generation_prompt,
        enable_thinking=think,
        flavor=chosen,
    )
    ids = tokenizer.encode_parts(prompt.parts)
    if as_json:
        payload = {
            "prompt": prompt.text,
            "token_ids": ids,
            "num_tokens": len(ids),
            "thinking": prompt.thinking,
            "family": chosen.name,
            "warnings": warnings,
        }
        typer.echo(json.dumps(payload, ensure_ascii=False))
        return
    out = Console(highlight=False, soft_wrap=True)
    for warning in warnings:
        out.print(Text(f"warning: {warning}", style="yellow"))
    out.print(Rule(f"prompt ({chosen.name}, thinking {'on' if prompt.thinking else 'off'})"))
    out.print(Text(prompt.text), end="")
    out.print(Rule(f"{len(ids)} token ids"))
    out.print(Text(" ".join(map(str, ids))))
