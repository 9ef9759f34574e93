"""The Qwen2/Qwen2.5/Qwen3 added tokens: ids, order and which are "special".

Contract: ADDED_TOKENS lists every added token in id order starting at FIRST_ADDED_ID. Only the
endoftext/im_* tokens and the vision/box/quad ones are special; tool, think and FIM tokens are plain
added tokens, so decoding with skip_special_tokens keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

BPE_VOCAB_SIZE = 151_643  # ranked byte sequences in qwen.tiktoken
FIRST_ADDED_ID = BPE_VOCAB_SIZE
CONFIG_VOCAB_SIZE = 151_936  # embedding rows in every Qwen2/2.5/3 config (padded)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool


_NAMES_AND_SPECIAL: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    (TOOL_CALL_START, False),
    (TOOL_CALL_END, False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    (TOOL_RESPONSE_START, False),
    (TOOL_RESPONSE_END, False),
    (THINK_START, False),
    (THINK_END, False),
)

ADDED_TOKENS: tuple[AddedToken, ...] = tuple(
    AddedToken(content, FIRST_ADDED_ID + i, special)
    for i, (content, special) in enumerate(_NAMES_AND_SPECIAL)
)
ADDED_TOKEN_IDS: dict[str, int] = {t.content: t.id for t in ADDED_TOKENS}

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
