"""The Qwen added tokens: ids, order and which are "special", for both vocabulary generations.

Contract: ADDED_TOKENS lists every Qwen2/2.5/3 added token in id order starting at FIRST_ADDED_ID. Only the
endoftext/im_* tokens and the vision/box/quad ones are special; tool, think and FIM tokens are plain
added tokens, so decoding with skip_special_tokens keeps them. QWEN3_5_ADDED_TOKENS is the Qwen3.5/3.6/3.8
table (248,320-row vocabulary): the same 26 tokens in the same order from id 248044, then 7 audio/TTS tokens.
VocabLayout bundles one generation's added tokens, padded config vocab_size and pre-tokenizer regex.
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
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"  # one per image in a rendered prompt; the engine expands it to the image's tokens


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


# Qwen3.5's regex adds \p{M} (combining marks) to the letter classes (transformers' Qwen3_5Tokenizer).
QWEN3_5_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN3_5_FIRST_ADDED_ID = 248_044  # <|endoftext|>; Qwen3.5's BPE vocabulary fills ids 0..248043
QWEN3_5_CONFIG_VOCAB_SIZE = 248_320
# After the Qwen2-era 26 (ids 248044..248069, </think> = 248069): Qwen3-Omni's audio/TTS tokens, all special.
_QWEN3_5_EXTRA: tuple[tuple[str, bool], ...] = (
    ("<|audio_start|>", True),
    ("<|audio_end|>", True),
    ("<tts_pad>", True),
    ("<tts_text_bos>", True),
    ("<tts_text_eod>", True),
    ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),
)
QWEN3_5_ADDED_TOKENS: tuple[AddedToken, ...] = tuple(
    AddedToken(content, QWEN3_5_FIRST_ADDED_ID + i, special)
    for i, (content, special) in enumerate(_NAMES_AND_SPECIAL + _QWEN3_5_EXTRA)
)
QWEN3_5_ADDED_TOKEN_IDS: dict[str, int] = {t.content: t.id for t in QWEN3_5_ADDED_TOKENS}


@dataclass(frozen=True)
class VocabLayout:
    """One Qwen vocabulary generation: where added tokens start, which they are, and the embedding rows."""

    name: str
    first_added_id: int
    added_tokens: tuple[AddedToken, ...]
    config_vocab_size: int
    pretokenize_regex: str

    @property
    def token_ids(self) -> dict[str, int]:
        return {t.content: t.id for t in self.added_tokens}


QWEN2_LAYOUT = VocabLayout("qwen2", FIRST_ADDED_ID, ADDED_TOKENS, CONFIG_VOCAB_SIZE, PRETOKENIZE_REGEX)
QWEN3_5_LAYOUT = VocabLayout(
    "qwen3_5",
    QWEN3_5_FIRST_ADDED_ID,
    QWEN3_5_ADDED_TOKENS,
    QWEN3_5_CONFIG_VOCAB_SIZE,
    QWEN3_5_PRETOKENIZE_REGEX,
)
