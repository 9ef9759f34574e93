"""QwenTokenizer: encode/decode for Qwen checkpoints, with the special-token injection guard.

Contract: encode_text() never yields added-token ids (a user typing "<|im_start|>" gets ordinary byte-level
ids): it runs a second `tokenizers.Tokenizer` made from the same tokenizer.json minus its added tokens.
encode_parts() maps Special markers to their ids and encodes text runs with encode_text, so for benign text it
equals encode() of the joined prompt. encode() matches added tokens and is for trusted text only.
Any real checkpoint's tokenizer.json loads unchanged (Qwen2/2.5/3's 151,665 ids, Qwen3.5's 248,077, extra
added tokens); one whose added-token ids the `tokenizers` library would silently renumber (a gap after the
vocabulary) is refused with a TokenizerError instead.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from qwenkit.tokenizer.build import builtin_tokenizer_json
from qwenkit.tokenizer.parts import Part, Special
from qwenkit.tokenizer.specials import ENDOFTEXT, IM_END
from qwenkit.tokenizer.vocab import TokenizerError

__all__ = ["QwenTokenizer", "TokenizerError"]


def _token_content(value: Any) -> str | None:
    """A tokenizer_config token entry: a string, an AddedToken dict ({"content": ...}) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"unreadable token entry {value!r} in tokenizer_config.json; expected a string")


def _check_added_ids(spec: Any, tokenizer: Tokenizer) -> None:
    """Every added token must get the id its tokenizer.json gives it (the library renumbers on a gap)."""
    entries = spec.get("added_tokens") if isinstance(spec, Mapping) else None
    for entry in entries or ():
        if not isinstance(entry, Mapping):
            continue
        content, want = entry.get("content"), entry.get("id")
        got = tokenizer.token_to_id(content) if isinstance(content, str) else None
        if isinstance(want, int) and got != want:
            raise TokenizerError(
                f"tokenizer.json gives {content!r} id {want} but it loads as id {got}: added-token ids must "
                "follow the vocabulary without gaps; re-download the tokenizer files"
            )


class QwenTokenizer:
    """A Qwen tokenizer: the full `tokenizers.Tokenizer` plus an added-token-free twin for untrusted text."""

    def __init__(self, tokenizer_json: str, eos_token: str, pad_token: str | None = None) -> None:
        try:
            spec = json.loads(tokenizer_json)
            self._full = Tokenizer.from_str(tokenizer_json)
            plain_spec = {**spec, "added_tokens": []}
            self._plain = Tokenizer.from_str(json.dumps(plain_spec))
        except Exception as exc:  # the Rust loader raises bare Exception subclasses
            raise TokenizerError(f"not a valid tokenizer.json ({exc}); re-download or rebuild it") from exc
        _check_added_ids(spec, self._full)
        decoder = self._full.get_added_tokens_decoder()
        self._added_ids = frozenset(decoder)
        self._special_ids = frozenset(i for i, tok in decoder.items() if tok.special)
        self._vocab_size = self._full.get_vocab_size(with_added_tokens=True)
        self._eos_token = eos_token
        self._eos_id = self._require_id(eos_token, "eos_token")
        self._pad_token = pad_token
        self._pad_id = None if pad_token is None else self._require_id(pad_token, "pad_token")

    def _require_id(self, token: str, role: str) -> int:
        token_id = self._full.token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"{role} {token!r} is not in the vocabulary; fix it in tokenizer_config.json"
            )
        return token_id

    @classmethod
    def from_dir(cls, path: Path | str) -> QwenTokenizer:
        """Load an HF-layout checkpoint's tokenizer.json; eos/pad come from its tokenizer_config.json."""
        path = Path(path)
        tokenizer_file, config_file = path / "tokenizer.json", path / "tokenizer_config.json"
        for needed in (tokenizer_file, config_file):
            if not needed.is_file():
                raise TokenizerError(
                    f"{needed} not found; point at a checkpoint dir with the hub's tokenizer files"
                )
        try:
            config = json.loads(config_file.read_text("utf-8"))
        except json.JSONDecodeError as exc:
            raise TokenizerError(f"{config_file} is not valid JSON ({exc}); re-download it") from exc
        eos = _token_content(config.get("eos_token"))
        if eos is None:
            raise TokenizerError(f"{config_file} has no eos_token; add one (e.g. {IM_END!r} for chat models)")
        pad = _token_content(config.get("pad_token"))
        return cls(tokenizer_file.read_text("utf-8"), eos_token=eos, pad_token=pad)

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Tokenizer, eos_token: str, pad_token: str | None = None
    ) -> QwenTokenizer:
        """Wrap an in-memory `tokenizers.Tokenizer` (e.g. build.build_tokenizer())."""
        return cls(tokenizer.to_str(), eos_token=eos_token, pad_token=pad_token)

    @classmethod
    def builtin(cls, env: Mapping[str, str] | None = None) -> QwenTokenizer:
        """The tokenizer built from dashscope's qwen.tiktoken (chat eos <|im_end|>, pad <|endoftext|>)."""
        path = builtin_tokenizer_json(env)
        try:
            return cls(path.read_text("utf-8"), eos_token=IM_END, pad_token=ENDOFTEXT)
        except (TokenizerError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cached {path} is unusable ({exc}); delete it to rebuild") from exc

    @property
    def backend(self) -> Tokenizer:
        """The full `tokenizers.Tokenizer` (added tokens matched)."""
        return self._full

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def pad_token(self) -> str | None:
        return self._pad_token

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, i.e. one past the largest (BPE vocabulary + added tokens); configs pad
        embeddings beyond this."""
        return self._vocab_size

    @property
    def added_token_ids(self) -> frozenset[int]:
        return self._added_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Added tokens marked special: the ones decode(skip_special_tokens=True) drops."""
        return self._special_ids

    def encode_text(self, text: str) -> list[int]:
        """Untrusted text → ids with added-token matching off: never an added-token id."""
        if not isinstance(text, str):
            raise TypeError(f"encode_text takes a str, got {type(text).__name__}; decode bytes first")
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        """Trusted text → ids, with added tokens such as <|im_start|> matched (HF's encoding)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}; decode bytes first")
        return self._full.encode(text, add_special_tokens=False).ids

    def encode_parts(self, parts: Sequence[Part]) -> list[int]:
        """Renderer parts → ids: Special markers become their added-token ids, text runs go to encode_text."""
        ids: list[int] = []
        text: list[str] = []
        for part in parts:
            if isinstance(part, str):
                text.append(part)
            elif isinstance(part, Special):
                if text:
                    ids += self.encode_text("".join(text))
                    text.clear()
                ids.append(self.special_id(part.token))
            else:
                raise TypeError(f"prompt parts must be str or Special, got {type(part).__name__}")
        if text:
            ids += self.encode_text("".join(text))
        return ids

    def special_id(self, token: str) -> int:
        """The id of an added token; TokenizerError if `token` is not one."""
        token_id = self._full.token_to_id(token)
        if token_id is None or token_id not in self._added_ids:
            raise TokenizerError(f"{token!r} is not an added token of this tokenizer; pass it as plain text")
        return token_id

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids → text (invalid UTF-8 becomes U+FFFD); skip_special_tokens drops only special added tokens."""
        # operator.index accepts numpy integers and rejects floats with a TypeError.
        ids = [operator.index(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise TokenizerError(
                f"token id {bad} is outside 0..{self._vocab_size - 1}; mask logits at or past vocab_size"
            )
        return self._full.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (byte-level spelling, e.g. "Ġthe") or added token, else None."""
        return self._full.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level spelling) or added token for an id, else None."""
        return None if token_id < 0 else self._full.id_to_token(token_id)
