"""The tokenizer inside a Qwen GGUF file, as a QwenTokenizer.

Contract: a .gguf carries the byte-level vocab, merges, token types and eos id; tokenizer_from_gguf
rebuilds the same tokenizer the checkpoint had (added tokens = control and user-defined entries, padding
rows skipped), so a GGUF-only model renders and guards prompts exactly like its HF original.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from gguf.gguf_reader import ReaderField

from qwenkit.gguf.reader import MetadataReader
from qwenkit.tokenizer.build import assemble_tokenizer
from qwenkit.tokenizer.specials import ADDED_TOKENS, AddedToken
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from qwenkit.tokenizer.vocab import TokenizerError

_QWEN_ADDED = {t.content: t for t in ADDED_TOKENS}


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
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == gguf.TokenType.NORMAL:
            vocab[token] = i
        elif kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            # llama.cpp marks every <|...|> token control; Qwen's own table says which are special.
            known = _QWEN_ADDED.get(token)
            added.append(
                AddedToken(token, i, special=known.special if known else kind == gguf.TokenType.CONTROL)
            )
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    tokenizer = assemble_tokenizer(vocab, merges, added)  # type: ignore[arg-type]
    pad = tokens[int(pad_field.contents())] if pad_field is not None else None
    return QwenTokenizer.from_tokenizer(tokenizer, eos_token=tokens[eos_id], pad_token=pad)
