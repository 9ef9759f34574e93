"""The tokenizer inside a Qwen GGUF file, as a QwenTokenizer.

Contract: a .gguf carries the byte-level vocab, merges, token types, eos id and pre-tokenizer name;
tokenizer_from_gguf rebuilds the same tokenizer the checkpoint had (added tokens = control and user-defined
entries, padding rows skipped; tokenizer.ggml.pre "qwen35" selects Qwen3.5's split regex and added-token
table), so a GGUF-only model renders and guards prompts exactly like its HF original.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from gguf.gguf_reader import ReaderField

from qwenkit.gguf.reader import MetadataReader
from qwenkit.tokenizer.build import assemble_tokenizer
from qwenkit.tokenizer.specials import QWEN2_LAYOUT, QWEN3_5_LAYOUT, AddedToken, VocabLayout
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from qwenkit.tokenizer.vocab import TokenizerError

# llama.cpp's pre-tokenizer names (written by qwenkit.gguf.convert) → our vocabulary layouts.
_LAYOUTS: dict[str, VocabLayout] = {"qwen2": QWEN2_LAYOUT, "qwen35": QWEN3_5_LAYOUT}


def _need(reader: gguf.GGUFReader, key: str) -> ReaderField:
    field = reader.get_field(key)
    if field is None:
        raise TokenizerError(f"GGUF has no {key}; re-create it with `qwenkit convert`")
    return field


def _strings(field: ReaderField) -> list[str]:
    """A string array read as one raw block (see MetadataReader): [u64 length][utf-8 bytes] repeated."""
    raw = bytes(field.parts[-1])
    out, pos, count = [], 0, int(field.parts[-2][0])
    for _ in range(count):
        n = int.from_bytes(raw[pos : pos + 8], "little")
        out.append(raw[pos + 8 : pos + 8 + n].decode("utf-8"))
        pos += 8 + n
    return out


def tokenizer_from_gguf(path: Path) -> QwenTokenizer:
    reader = MetadataReader(path)
    model = _need(reader, "tokenizer.ggml.model").contents()
    if model != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model is {model!r}, not Qwen's byte-level BPE ('gpt2')")
    tokens = _strings(_need(reader, "tokenizer.ggml.tokens"))
    types = [int(t) for t in _need(reader, "tokenizer.ggml.token_type").contents()]
    merges_raw = _strings(_need(reader, "tokenizer.ggml.merges"))
    eos_id = int(_need(reader, "tokenizer.ggml.eos_token_id").contents())
    pad_field = reader.get_field("tokenizer.ggml.padding_token_id")
    pre_field = reader.get_field("tokenizer.ggml.pre")
    layout = _LAYOUTS.get(pre_field.contents() if pre_field is not None else "qwen2", QWEN2_LAYOUT)
    known_added = {t.content: t for t in layout.added_tokens}
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == gguf.TokenType.NORMAL:
            vocab[token] = i
        elif kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            # llama.cpp marks every <|...|> token control; Qwen's own table says which are special.
            known = known_added.get(token)
            added.append(
                AddedToken(token, i, special=known.special if known else kind == gguf.TokenType.CONTROL)
            )
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    tokenizer = assemble_tokenizer(vocab, merges, added, layout.pretokenize_regex)  # type: ignore[arg-type]
    pad = tokens[int(pad_field.contents())] if pad_field is not None else None
    return QwenTokenizer.from_tokenizer(tokenizer, eos_token=tokens[eos_id], pad_token=pad)
