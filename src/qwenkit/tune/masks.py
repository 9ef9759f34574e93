"""Training sequences: an Example rendered with the model's own chat family, tokens and loss labels.

Contract: encode_example() renders the conversation exactly as serving would (family.render, no generation
prompt), so the training text is the serving text byte for byte, and tokenizes it with encode_parts (markup
→ special ids, caller text never). labels[i] = input_ids[i] only for tokens inside an assistant turn's own
output (RenderedPrompt.assistant_spans, through its <|im_end|>), else -100: system, user and tool tokens and
turn headers never carry loss. What the serving generation prompt already holds (Qwen3.5's opened
`<think>\n`, the empty think block of non-thinking mode) is prompt, not target. Thinking families in
thinking mode learn only the turns after the latest user query (the ones whose reasoning the template
keeps); `think=False` (--no-think-data) renders in non-thinking mode with reasoning dropped.
Truncation policy: an example longer than max_len is dropped, never cut (a cut target would teach the model
to stop mid-answer without <|im_end|>); prepare() counts the drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qwenkit.chat.families import ChatFamily
from qwenkit.chat.families.base import Builder, last_query_index
from qwenkit.chat.messages import Message
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from qwenkit.tune.data import Example, TuneDataError

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    text: str
    spans: tuple[tuple[int, int], ...]
    line: int = 0


@dataclass
class Prepared:
    """Encoded examples plus what happened to the rest (dropped for length)."""

    examples: list[Encoded] = field(default_factory=list)
    dropped_long: list[int] = field(default_factory=list)  # line numbers
    tokens: int = 0
    target_tokens: int = 0


def generation_prefix(family: ChatFamily, enable_thinking: bool | None) -> str:
    """What the family's generation prompt writes after `<|im_start|>assistant\\n` (prompt, not target)."""
    out = Builder()
    family._generation_prompt(out, family.resolve_thinking([], enable_thinking), enable_thinking)
    text = "".join(str(p) for p in out.parts)
    return text.split("assistant\n", 1)[1] if "assistant\n" in text else ""


def _strip_reasoning(m: Message) -> Message:
    if m.role != "assistant":
        return m
    content = m.content or ""
    if "</think>" in content:
        content = content.split("</think>")[-1].lstrip("\n")
    return m.model_copy(update={"reasoning_content": None, "content": content})


def token_byte_lengths(tokenizer: QwenTokenizer, ids: Sequence[int]) -> list[int]:
    """UTF-8 byte length of each token: added tokens by their text, byte-level BPE tokens one char a byte."""
    added = tokenizer.added_token_ids
    out = []
    for i in ids:
        piece = tokenizer.id_to_token(i) or ""
        out.append(len(piece.encode("utf-8")) if i in added else len(piece))
    return out


def encode_example(
    example: Example, family: ChatFamily, tokenizer: QwenTokenizer, *, think: bool = True
) -> Encoded:
    """Render and tokenize one example with loss labels (see the module docstring)."""
    messages = list(example.messages)
    thinking = family.thinks and think
    if family.thinks and not think:
        messages = [_strip_reasoning(m) for m in messages]
    enable = None if not family.thinks else think
    try:
        rendered = family.render(
            messages, list(example.tools) or None, add_generation_prompt=False, enable_thinking=enable
        )
    except ValueError as exc:
        raise TuneDataError(f"line {example.line}: {exc}") from None
    text = rendered.text
    spans = list(rendered.assistant_spans())
    if thinking:
        # Only turns after the latest user query keep their reasoning in the template: learn those.
        query = last_query_index(messages, strip=True)
        owners = [i for i, m in enumerate(messages) if m.role == "assistant"]
        if query is not None and len(owners) == len(spans):
            spans = [s for s, i in zip(spans, owners, strict=True) if i > query]
    skip = generation_prefix(family, enable)
    if skip:
        spans = [(a + len(skip), b) if text.startswith(skip, a) else (a, b) for a, b in spans]
    ids = tokenizer.encode_parts(rendered.parts)
    labels = [IGNORE] * len(ids)
    byte_spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]
    pos = 0
    for k, n in enumerate(token_byte_lengths(tokenizer, ids)):
        if any(a <= pos and pos + n <= b for a, b in byte_spans):
            labels[k] = ids[k]
        pos += n
    if pos != len(text.encode()):
        raise TuneDataError(
            f"line {example.line}: tokens do not cover the rendered text (tokenizer mismatch)"
        )
    return Encoded(ids, labels, text, tuple(spans), example.line)
