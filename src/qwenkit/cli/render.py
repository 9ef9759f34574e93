"""`qwenkit render`: print the exact prompt and token ids a conversation becomes, and the chat family used.

The family comes from the checkpoint's own chat template (model_type only when it has none); --family
overrides it. Images (image_url parts in --messages, or --image PATH added to the last user message) show
as the family's placeholder (<|vision_start|><|image_pad|><|vision_end|>), one <|image_pad|> id each; for a
checkpoint with an image processor, each --image is read and its image-token count shown (the engine
expands each placeholder to that many tokens). --json prints {prompt, token_ids, num_tokens, thinking,
family, warnings, images}.
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
from qwenkit.media import VisionSpec, decode_image, image_tokens, prepare_image, read_image_file
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
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="A picture added to the last user message (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Print the exact prompt and token ids a conversation becomes."""
    conv, tool_defs = _conversation(messages, tools, system, user)
    _attach(conv, image or [])
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
    shown = _images(image or [], VisionSpec.from_checkpoint(resolved.path))
    if as_json:
        payload = {
            "prompt": prompt.text,
            "token_ids": ids,
            "num_tokens": len(ids),
            "thinking": prompt.thinking,
            "family": chosen.name,
            "warnings": warnings,
            "images": shown,
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
    for i, info in enumerate(shown, 1):
        size = f"{info['width']}x{info['height']}"
        tokens = f", {info['tokens']} image tokens" if info["tokens"] is not None else ""
        out.print(Text(f"image {i}: {info['path']} ({size}{tokens})", style="dim"))


def _attach(conv: list[dict[str, Any]], paths: list[Path]) -> None:
    """Add image parts for `paths` before the text of the last user message."""
    if not paths:
        return
    last = next((m for m in reversed(conv) if isinstance(m, dict) and m.get("role") == "user"), None)
    if last is None:
        raise ValueError("--image needs a user message to attach to: pass --user TEXT")
    content = last.get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
    images = [{"type": "image_url", "image_url": {"url": p.expanduser().resolve().as_uri()}} for p in paths]
    last["content"] = [*images, *parts]


def _images(paths: list[Path], spec: VisionSpec | None) -> list[dict[str, Any]]:
    """Each --image as the model will see it: its size after the processor's resize and its token count."""
    shown = []
    for path in paths:
        pixels = decode_image(read_image_file(path), what=str(path))
        if spec is not None:
            pixels = prepare_image(pixels, spec).pixels
        height, width = pixels.shape[:2]
        tokens = image_tokens(pixels, spec) if spec is not None else None
        shown.append({"path": str(path), "width": width, "height": height, "tokens": tokens})
    return shown
