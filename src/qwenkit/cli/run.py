"""`qwenkit generate` and `qwenkit chat`: stream a Qwen model's answer in the terminal, thinking apart.

Both open the model through the same loader and the same chat pipeline the server uses; only the
printing differs. With no --model they run the built-in demo model (random weights) and say so. Images
(`generate --image PATH`, `/image PATH` in chat) are read from local files by qwenkit.media under its
default caps and need the model's vision projector (--mmproj FILE, or 'auto' for a VL checkpoint; generate
--image defaults to 'auto').
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from qwenkit.chat.messages import Message, Tool, image_parts, messages_from_openai, tools_from_openai
from qwenkit.chat.parse import ParseAccumulator, ParsedOutput, ToolCallDelta
from qwenkit.chat.pipeline import PreparedChat, prepare_chat
from qwenkit.chat.presets import apply_preset, find_preset, load_presets
from qwenkit.checkpoints.demo import DEMO_NOTICE
from qwenkit.cli.common import (
    THREADS_HELP,
    AllowPickleOption,
    MmprojOption,
    ModelOption,
    PollOption,
    QuantOption,
    engine_threads,
    open_model_files,
    vision_spec,
)
from qwenkit.cli.errors import err_console, friendly_errors
from qwenkit.engines.grammar import grammar_from_json_schema
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.request import Grammar, ImageInput
from qwenkit.media import VisionSpec, decode_image, image_tokens, prepare_image, read_image_file

if TYPE_CHECKING:
    from qwenkit.engines.llamacpp.engine import LlamaCppEngine
    from qwenkit.engines.loader import ModelFiles

ThinkOption = Annotated[
    bool | None, typer.Option("--think/--no-think", help="Thinking mode; default: soft switches, else on.")
]
MaxTokensOption = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")]
TemperatureOption = Annotated[float | None, typer.Option(help="Default: Qwen's for the mode (0.6 / 0.7).")]
TopPOption = Annotated[float | None, typer.Option("--top-p", help="Default: 0.95 thinking, 0.8 otherwise.")]
TopKOption = Annotated[int | None, typer.Option("--top-k", help="Default: 20.")]
SeedOption = Annotated[int | None, typer.Option(help="Same seed, same output.")]
BudgetOption = Annotated[
    int | None, typer.Option("--thinking-budget", min=1, help="Most thinking tokens before answering.")
]
ToolsOption = Annotated[Path | None, typer.Option(help="JSON file with OpenAI-style tool definitions.")]
PresetOption = Annotated[
    str | None,
    typer.Option("--preset", help="A prompt preset: reasoning, coding, multilingual, or one of --presets."),
]
PresetArgOption = Annotated[
    list[str] | None, typer.Option("--preset-arg", help="A preset argument NAME=VALUE (repeatable).")
]
PresetsFileOption = Annotated[
    Path | None, typer.Option("--presets", help="A YAML file of presets added to the built-in ones.")
]
CtxOption = Annotated[
    int | None, typer.Option("--ctx", min=64, help="Context length (default: sized to the need).")
]
ThreadsOption = Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)]
LoraOption = Annotated[
    Path | None,
    typer.Option(
        "--lora",
        exists=True,
        help="Run with this LoRA adapter, unmerged: a `qwenkit tune` --out dir or a LoRA .gguf.",
    ),
]
ImageOption = Annotated[
    list[Path] | None,
    typer.Option("--image", help="A picture (PNG, JPEG, WebP, GIF) for the model to read (repeatable)."),
]
NO_VISION = "this model has no vision projector: pass --mmproj FILE (or --mmproj auto for a VL checkpoint)"


@dataclass
class Options:
    max_tokens: int
    sampling: dict[str, object]
    enable_thinking: bool | None
    tools: list[Tool] | None
    grammar: Grammar | None


def _load_tools(path: Path | None) -> list[Tool] | None:
    if path is None:
        return None
    data = json.loads(path.read_text("utf-8"))
    return tools_from_openai(data if isinstance(data, list) else [data])


def _open(
    model: str | None,
    allow_pickle: bool,
    quant: str,
    n_ctx: int,
    threads: int | None,
    poll: str,
    mmproj: str | None = None,
    lora: Path | None = None,
) -> tuple[ModelFiles, LlamaCppEngine]:
    cpu = engine_threads(threads, poll, say_default=False)  # before llama.cpp loads
    from qwenkit.engines.loader import open_engine  # llama.cpp loads only when a model is run

    files = open_model_files(model, allow_pickle, quant, mmproj)
    if files.n_ctx_train:
        n_ctx = min(n_ctx, files.n_ctx_train)
    loras: dict[str, Path] = {}
    if lora is not None:  # every request then runs with it (stream_chat)
        from qwenkit.gguf.lora import resolve_loras

        base, loras = resolve_loras({"lora": lora}, files.gguf_path)
        files = replace(files, gguf_path=base)
    config = EngineConfig(n_ctx=n_ctx, max_seqs=1, mmproj=files.mmproj_path, loras=loras, **cpu.config())
    return files, open_engine(files, config)


class StreamPrinter:
    """Prints parse deltas: thinking dim and apart, then the answer, then tool calls as they stream."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.section: str | None = None
        self._call_open = False

    def _close_call(self) -> None:
        if self._call_open:
            self.console.print(")", highlight=False)
            self._call_open = False

    def _enter(self, section: str) -> None:
        self._close_call()
        if self.section != section:
            if self.section not in (None, "tools"):
                self.console.print()
            if section == "reasoning":
                self.console.print("[dim]thinking…[/]")
            elif section == "content" and self.section == "reasoning":
                self.console.print("[dim]answer:[/]")
            self.section = section

    def show(self, reasoning: str, content: str, calls: list[ToolCallDelta]) -> None:
        if reasoning:
            self._enter("reasoning")
            self.console.print(reasoning, end="", style="dim italic", markup=False, highlight=False)
        if content:
            self._enter("content")
            self.console.print(content, end="", markup=False, highlight=False)
        for call in calls:
            if call.name is not None:  # a new call starts
                self._enter("tools")
                self.console.print(f"[bold cyan]tool call[/] {escape(call.name)}(", end="", highlight=False)
                self._call_open = True
            self.console.print(call.arguments, end="", markup=False, highlight=False)

    def end(self) -> None:
        if self._call_open:
            self._close_call()
        elif self.section is not None:
            self.console.print()


def stream_chat(engine: LlamaCppEngine, prepared: PreparedChat, console: Console) -> tuple[ParsedOutput, str]:
    """Run one chat turn, printing as it streams; returns the parsed result and a stats line."""
    parser = prepared.parser()
    acc = ParseAccumulator()
    printer = StreamPrinter(console)
    start = time.perf_counter()
    first: float | None = None
    finish, n_out = None, 0
    request = replace(prepared.request, adapter=(engine.adapters.names or (None,))[0])  # --lora, if any
    for event in engine.generate_sync(request):
        first = first or time.perf_counter()
        delta = parser.feed(event.text)
        if event.finished:
            tail = parser.finish()
            delta = delta.then(tail)
            finish, n_out = event.finish_reason, event.completion_tokens
            if event.error:
                raise ValueError(event.error)
        acc.add(delta)
        printer.show(delta.reasoning, delta.content, delta.tool_calls)
    printer.end()
    result = acc.result()
    elapsed = time.perf_counter() - start
    ttft = (first or start) - start
    rate = n_out / max(elapsed - ttft, 1e-9) if n_out > 1 else 0.0
    stats = f"{n_out} tokens, {rate:.1f} tok/s, first token {ttft * 1000:.0f} ms, finish: {finish}"
    if result.reasoning_truncated:
        stats += " (thinking was cut off before the answer: raise --max-tokens or set --thinking-budget)"
    return result, stats


def _options(
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    thinking_budget: int | None,
    think: bool | None,
    tools: Path | None,
    json_schema: Path | None,
) -> Options:
    sampling: dict[str, object] = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "max_tokens": max_tokens,
        "thinking_budget": thinking_budget,
    }
    grammar = None
    if json_schema is not None:
        grammar = grammar_from_json_schema(json.loads(json_schema.read_text("utf-8")))
    return Options(max_tokens, sampling, think, _load_tools(tools), grammar)


def _with_preset(
    raw: list[dict[str, Any]],
    opts: Options,
    name: str | None,
    args: list[str] | None,
    presets_file: Path | None,
) -> list[dict[str, Any]]:
    """The messages with the preset's system prompt; its sampling fills what the options left unset."""
    if name is None:
        if args:
            raise ValueError("--preset-arg needs --preset NAME")
        return raw
    pairs = [a.partition("=") for a in args or ()]
    bad = [a for a, eq, _ in pairs if not eq or not a]
    if bad:
        raise ValueError(f"--preset-arg {bad[0]!r}: write NAME=VALUE")
    presets = load_presets(presets_file) if presets_file else None
    preset = find_preset(name, presets)
    messages, opts.sampling = apply_preset(preset, raw, opts.sampling, {k: v for k, _, v in pairs})
    if opts.enable_thinking is None:
        opts.enable_thinking = preset.enable_thinking
    return messages


@friendly_errors
def generate_command(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: ModelOption = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system message.")] = None,
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    top_k: TopKOption = None,
    seed: SeedOption = None,
    think: ThinkOption = None,
    thinking_budget: BudgetOption = None,
    tools: ToolsOption = None,
    preset: PresetOption = None,
    preset_arg: PresetArgOption = None,
    presets: PresetsFileOption = None,
    json_schema: Annotated[
        Path | None, typer.Option("--json-schema", help="Answer must be JSON valid against this schema file.")
    ] = None,
    image: ImageOption = None,
    mmproj: MmprojOption = None,
    lora: LoraOption = None,
    ctx: CtxOption = None,
    threads: ThreadsOption = None,
    poll: PollOption = "auto",
    quant: QuantOption = "q8_0",
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Generate one answer to PROMPT, streaming; thinking is shown apart from the answer."""
    opts = _options(max_tokens, temperature, top_p, top_k, seed, thinking_budget, think, tools, json_schema)
    # Decoded before the model loads: a bad picture fails in a moment, not after a conversion.
    pictures = [decode_image(read_image_file(path), what=str(path)) for path in image or ()]
    raw: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    raw.append({"role": "user", "content": _with_pictures(prompt, image or [])})
    messages = messages_from_openai(_with_preset(raw, opts, preset, preset_arg, presets))
    if pictures and mmproj is None:
        mmproj = "auto"
    files, engine = _open(model, allow_pickle, quant, ctx or 1 << 30, threads, poll, mmproj, lora)
    try:
        spec = vision_spec(files)
        if pictures and spec is None:
            raise ValueError(NO_VISION)
        images = [prepare_image(pixels, spec) for pixels in pictures]
        prepared = _prepare(files, messages, opts, engine, images, spec)
        for warning in prepared.warnings:
            err_console.print(f"[yellow]warning:[/] {warning}")
        _, stats = stream_chat(engine, prepared, Console(highlight=False))
        err_console.print(f"[dim]{stats}[/]")
        if files.is_demo:
            err_console.print(f"[yellow]{DEMO_NOTICE}[/]", soft_wrap=True)
    finally:
        engine.close()


def _with_pictures(text: str, paths: list[Path]) -> str | list[dict[str, Any]]:
    """A user message's content: the text, after image parts naming the local files (read by the CLI)."""
    if not paths:
        return text
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": path.expanduser().resolve().as_uri()}} for path in paths
    ]
    return [*parts, {"type": "text", "text": text}]


def _prepare(
    files: ModelFiles,
    messages: list[Message],
    opts: Options,
    engine: LlamaCppEngine,
    images: list[ImageInput] | None = None,
    spec: VisionSpec | None = None,
) -> PreparedChat:
    images = images or []
    prepared = prepare_chat(
        files.tokenizer,
        messages,
        flavor=files.family,
        tools=opts.tools,
        enable_thinking=opts.enable_thinking,
        sampling=opts.sampling,
        grammar=opts.grammar,
        images=images,
    )
    # Each image's one placeholder becomes its image tokens in the engine.
    extra = sum(image_tokens(i.pixels, spec) - 1 for i in images) if spec else 0
    n_prompt = len(prepared.request.prompt_token_ids) + extra
    room = engine.n_ctx - n_prompt
    if room < 1:
        raise ValueError(
            f"the conversation ({n_prompt} tokens) fills the context ({engine.n_ctx}); use /reset or a "
            "larger --ctx"
        )
    if opts.max_tokens > room:
        sampling = prepared.request.sampling.model_copy(update={"max_tokens": room})
        prepared = replace(prepared, request=replace(prepared.request, sampling=sampling))
    return prepared


CHAT_HELP = (
    "/think, /no_think: switch thinking · /image PATH: attach a picture to your next message · "
    "/reset: forget the conversation · /exit: quit (or Ctrl-D)"
)


@friendly_errors
def chat_command(
    model: ModelOption = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system message.")] = None,
    max_tokens: MaxTokensOption = 1024,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    top_k: TopKOption = None,
    seed: SeedOption = None,
    think: ThinkOption = None,
    thinking_budget: BudgetOption = None,
    tools: ToolsOption = None,
    preset: PresetOption = None,
    preset_arg: PresetArgOption = None,
    presets: PresetsFileOption = None,
    ctx: Annotated[
        int, typer.Option("--ctx", min=256, help="Context length for the whole conversation.")
    ] = 8192,
    mmproj: MmprojOption = None,
    lora: LoraOption = None,
    threads: ThreadsOption = None,
    poll: PollOption = "auto",
    quant: QuantOption = "q8_0",
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Chat in the terminal. /think and /no_think switch thinking mode; /image PATH attaches a picture;
    /reset forgets; /exit quits."""
    opts = _options(max_tokens, temperature, top_p, top_k, seed, thinking_budget, think, tools, None)
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    history = _with_preset(history, opts, preset, preset_arg, presets)
    files, engine = _open(model, allow_pickle, quant, ctx, threads, poll, mmproj, lora)
    spec = vision_spec(files)
    pictures = Pictures(spec)
    console = Console(highlight=False)
    base = list(history)
    console.print(f"[dim]{files.name} · context {engine.n_ctx} tokens · {CHAT_HELP}[/]")
    try:
        while True:
            try:
                line = console.input("[bold green]you>[/] ")
            except EOFError:
                console.print()
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                history = list(base)
                pictures.pending.clear()
                console.print("[dim]conversation cleared[/]")
                continue
            if text == "/image" or text.startswith("/image "):
                try:
                    console.print(f"[dim]{escape(pictures.attach(text[len('/image') :].strip()))}[/]")
                except ValueError as exc:
                    err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
                continue
            if text in ("/think", "/no_think"):
                opts.enable_thinking = text == "/think"
                console.print(f"[dim]thinking {'on' if opts.enable_thinking else 'off'}[/]")
                continue
            if text == "/help":
                console.print(f"[dim]{CHAT_HELP}[/]")
                continue
            history.append({"role": "user", "content": pictures.content(line)})
            try:
                messages = messages_from_openai(history)
                prepared = _prepare(files, messages, opts, engine, pictures.images(messages), spec)
            except ValueError as exc:
                history.pop()
                err_console.print(f"[bold red]error:[/] {exc}")
                continue
            pictures.pending.clear()
            console.print("[bold blue]qwen>[/] ", end="")
            result, stats = stream_chat(engine, prepared, console)
            err_console.print(f"[dim]{stats}[/]")
            history.append(_assistant_turn(result))
    finally:
        engine.close()
        if files.is_demo:
            err_console.print(f"[yellow]{DEMO_NOTICE}[/]", soft_wrap=True)


class Pictures:
    """The chat's pictures: `/image PATH` reads and sizes one (kept by its file URL) and holds it for the
    next message; every turn re-renders the history, so each image part finds its picture again."""

    def __init__(self, spec: VisionSpec | None) -> None:
        self.spec = spec
        self.pending: list[Path] = []
        self.loaded: dict[str, ImageInput] = {}

    def attach(self, arg: str) -> str:
        """Read the picture at `arg` now (a bad one fails here); returns the line to show."""
        if not arg:
            raise ValueError("/image needs a path: /image photo.png")
        if self.spec is None:
            raise ValueError(NO_VISION.replace("pass", "restart chat with"))
        path = Path(arg).expanduser().resolve()
        image = prepare_image(decode_image(read_image_file(path), what=str(path)), self.spec)
        self.loaded[path.as_uri()] = image
        self.pending.append(path)
        height, width = image.pixels.shape[:2]
        tokens = image_tokens(image.pixels, self.spec)
        return f"attached {path.name} ({width}x{height}, {tokens} image tokens); now ask about it"

    def content(self, line: str) -> str | list[dict[str, Any]]:
        return _with_pictures(line, self.pending)

    def images(self, messages: list[Message]) -> list[ImageInput]:
        return [self.loaded[part.url] for part in image_parts(messages)]


def _assistant_turn(result: ParsedOutput) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "assistant", "content": result.content or ""}
    if result.reasoning:
        turn["reasoning_content"] = result.reasoning
    if result.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.tool_calls
        ]
    if not turn["content"] and not result.tool_calls and not result.reasoning:
        turn["content"] = " "
    return turn
