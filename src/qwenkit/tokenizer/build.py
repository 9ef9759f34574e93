"""Build the real Qwen tokenizer offline from dashscope's qwen.tiktoken, in the Hugging Face layout.

Contract: build_tokenizer() gives a `tokenizers.Tokenizer` whose ids equal tiktoken's on NFC-normalised text
(byte-level BPE, PRETOKENIZE_REGEX split, no BOS/unk/byte fallback) plus specials.ADDED_TOKENS from id 151643.
With layout=QWEN3_5_LAYOUT it is the Qwen3.5 stand-in: the same 151,643 BPE tokens, unreachable placeholder
entries (UNUSED_FORMAT) filling ids 151643..248043, Qwen3.5's added tokens at their real ids from 248044 and
Qwen3.5's pre-tokenizer regex (no registry package ships the real 248,320-token vocabulary).
builtin_tokenizer_json(env, layout) caches a build under cache_root(env)/tokenizer/<key>/ (building merges
costs seconds). write_tokenizer_files() writes tokenizer.json, tokenizer_config.json, vocab.json and
merges.txt, loadable by tokenizers and transformers' AutoTokenizer. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from qwenkit.paths import cache_root
from qwenkit.tokenizer.specials import (
    ENDOFTEXT,
    FIRST_ADDED_ID,
    IM_END,
    PRETOKENIZE_REGEX,
    QWEN2_LAYOUT,
    VocabLayout,
)
from qwenkit.tokenizer.specials import (
    AddedToken as SpecAddedToken,
)
from qwenkit.tokenizer.vocab import TokenizerError, load_ranks, vocab_path

# Bump whenever the built tokenizer.json would change, so stale caches are not reused.
BUILDER_VERSION = "qwenkit-tokenizer-1"
MODEL_MAX_LENGTH = 131_072
# Vocabulary rows the stand-in Qwen3.5 tokenizer cannot produce: no merge leads to them, so BPE never emits
# them; they only keep the real ids of the added tokens. Decoded, they read as this text.
UNUSED_FORMAT = "<|qwenkit_unused_{}|>"
MERGES_HEADER = "#version: 0.2"
# False, as in the hub's Qwen2/2.5/3 tokenizer.json: every vocabulary entry is reachable through its derived
# merges, so tiktoken's whole-word lookup shortcut changes nothing (the tests check both facts).
IGNORE_MERGES = False


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _merge_parts(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts tiktoken's byte-pair merging joins last to form `token`, using only lower ranks."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            raise TokenizerError(
                f"token {token!r} (rank {rank}) cannot be formed from lower ranks; bad vocabulary"
            )
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    left, right = parts
    if ranks.get(left, rank) >= rank or ranks.get(right, rank) >= rank:
        raise TokenizerError(f"token {token!r} (rank {rank}) splits into unranked parts; bad vocabulary")
    return left, right


def derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One BPE merge per multi-byte token, in rank order (the merges.txt the hub ships)."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return [_merge_parts(token, rank, ranks) for token, rank in ordered if len(token) > 1]


def build_tokenizer(
    ranks: Mapping[bytes, int] | None = None, layout: VocabLayout = QWEN2_LAYOUT
) -> Tokenizer:
    """The Qwen tokenizer built from the tiktoken ranks (dashscope's unless given), in `layout`'s ids."""
    ranks = load_ranks() if ranks is None else ranks
    byte_char = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(left), to_str(right)) for left, right in derive_merges(ranks)]
    if len(vocab) != FIRST_ADDED_ID:
        raise TokenizerError(
            f"vocabulary has {len(vocab)} tokens, expected {FIRST_ADDED_ID}; reinstall dashscope"
        )
    for token_id in range(len(vocab), layout.first_added_id):
        vocab[UNUSED_FORMAT.format(token_id)] = token_id
    return assemble_tokenizer(vocab, merges, layout.added_tokens, layout.pretokenize_regex)


def assemble_tokenizer(
    vocab: Mapping[str, int],
    merges: Sequence[tuple[str, str]],
    added: Sequence[SpecAddedToken],
    pretokenize_regex: str = PRETOKENIZE_REGEX,
) -> Tokenizer:
    """A Qwen byte-level BPE tokenizer from its byte-level vocab, merges and added tokens (in id order)."""
    model = models.BPE(
        vocab=dict(vocab),
        merges=list(merges),
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=IGNORE_MERGES,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pretokenize_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    # A ByteLevel post-processor only fixes offsets (adds no BOS), as in the hub's tokenizer.json.
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.add_tokens(
        [
            AddedToken(
                t.content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=t.special
            )
            for t in added
        ]
    )
    for t in added:
        if tokenizer.token_to_id(t.content) != t.id:
            raise TokenizerError(f"{t.content} got id {tokenizer.token_to_id(t.content)}, expected {t.id}")
    return tokenizer


def added_tokens_decoder(layout: VocabLayout = QWEN2_LAYOUT) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's added_tokens_decoder: id string → AddedToken fields."""
    return {
        str(t.id): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t.special,
        }
        for t in layout.added_tokens
    }


def tokenizer_config(
    chat_template: str | None, eos_token: str = IM_END, layout: VocabLayout = QWEN2_LAYOUT
) -> dict[str, Any]:
    """tokenizer_config.json as the Qwen2.5/Qwen3/Qwen3.5 hub repos have it (eos <|im_end|> for chat)."""
    if eos_token not in layout.token_ids:
        raise TokenizerError(
            f"eos_token {eos_token!r} is not a Qwen added token; use {IM_END!r} or {ENDOFTEXT!r}"
        )
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder(layout),
        "additional_special_tokens": [
            t.content for t in layout.added_tokens if t.special and t.content != ENDOFTEXT
        ],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH if layout is QWEN2_LAYOUT else 262_144,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _cache_key(vocab_file: Path, layout: VocabLayout = QWEN2_LAYOUT) -> str:
    digest = hashlib.sha256(vocab_file.read_bytes())
    digest.update(BUILDER_VERSION.encode())
    if layout is not QWEN2_LAYOUT:
        # The Qwen2 key stays as it was, so existing caches are reused.
        digest.update(layout.name.encode())
    return digest.hexdigest()[:16]


def _write_temp(target: Path, text: str) -> Path:
    """Write `text` to a fresh temp file beside `target` (same filesystem, so the rename is atomic)."""
    # open(..., "x") rather than mkstemp so the file gets the usual umask permissions, not 0600.
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temp.open("x", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _atomic_write_all(files: Mapping[Path, str]) -> None:
    """Write every file to a temp name first, then rename them all into place."""
    temps: dict[Path, Path] = {}
    try:
        for target, text in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            temps[target] = _write_temp(target, text)
        for target, temp in temps.items():
            os.replace(temp, target)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def builtin_tokenizer_json(env: Mapping[str, str] | None = None, layout: VocabLayout = QWEN2_LAYOUT) -> Path:
    """Path of the cached tokenizer.json built from dashscope's vocabulary; builds it on first use."""
    source = vocab_path()
    target = cache_root(env) / "tokenizer" / _cache_key(source, layout) / "tokenizer.json"
    if not target.is_file():
        tokenizer = build_tokenizer(load_ranks(source), layout)
        _atomic_write_all({target: tokenizer.to_str(pretty=False)})
    return target


def _vocab_and_merges(tokenizer_json: Mapping[str, Any]) -> tuple[str, str]:
    """vocab.json and merges.txt text from a byte-level BPE tokenizer.json's model section."""
    model = tokenizer_json["model"]
    vocab_json = json.dumps(model["vocab"], ensure_ascii=False)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return vocab_json, "\n".join([MERGES_HEADER, *merges]) + "\n"


def write_tokenizer_files(
    out_dir: Path,
    chat_template: str | None,
    eos_token: str = IM_END,
    env: Mapping[str, str] | None = None,
    layout: VocabLayout = QWEN2_LAYOUT,
) -> None:
    """Write tokenizer.json, tokenizer_config.json, vocab.json and merges.txt into `out_dir` (created)."""
    out_dir = Path(out_dir)
    config = tokenizer_config(chat_template, eos_token, layout)
    tokenizer_text = builtin_tokenizer_json(env, layout).read_text("utf-8")
    vocab_json, merges_txt = _vocab_and_merges(json.loads(tokenizer_text))
    _atomic_write_all(
        {
            out_dir / "tokenizer.json": tokenizer_text,
            out_dir / "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            out_dir / "vocab.json": vocab_json,
            out_dir / "merges.txt": merges_txt,
        }
    )
