"""Engine log-probabilities (token ids) → OpenAI's logprobs shapes (token strings and their bytes).

Contract: TokenTexts gives a token's text (tokenizer.decode([id]); a partial UTF-8 sequence shows as U+FFFD)
and its exact bytes (from the byte-level vocabulary entry, or an added token's text), cached per id.
chat_logprobs() builds the chat `logprobs.content` entries, completion_logprobs() the legacy
/v1/completions shape; both take the engine's TokenLogprob list as it streams.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwenkit.engines.request import TokenLogprob
from qwenkit.serve.protocol import CompletionLogprobs, TopLogprob
from qwenkit.serve.protocol import TokenLogprob as TokenLogprobOut
from qwenkit.tokenizer.build import bytes_to_unicode
from qwenkit.tokenizer.tokenizer import QwenTokenizer


class TokenTexts:
    def __init__(self, tokenizer: QwenTokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token id."""
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = (self._text(token_id), list(self._bytes(token_id)))
        return found

    def _text(self, token_id: int) -> str:
        try:
            return self._tokenizer.decode([token_id])
        except ValueError:  # an id past the vocabulary (padding rows): no text
            return ""

    def _bytes(self, token_id: int) -> bytes:
        entry = self._tokenizer.id_to_token(token_id)
        if entry is None:
            return b""
        if token_id in self._tokenizer.added_token_ids:
            return entry.encode("utf-8")
        if all(ch in self._byte_of for ch in entry):
            return bytes(self._byte_of[ch] for ch in entry)
        return entry.encode("utf-8")


def chat_logprobs(texts: TokenTexts, items: Sequence[TokenLogprob], top: int) -> list[TokenLogprobOut]:
    out = []
    for item in items:
        text, raw = texts.get(item.token_id)
        alternatives = [TopLogprob(token=t, logprob=lp, bytes=b) for t, b, lp in _top(texts, item, top)]
        out.append(TokenLogprobOut(token=text, logprob=item.logprob, bytes=raw, top_logprobs=alternatives))
    return out


def completion_logprobs(
    texts: TokenTexts, items: Sequence[TokenLogprob], top: int, offset: int
) -> CompletionLogprobs:
    """The legacy shape; text_offset counts characters from `offset` (the text already returned)."""
    tokens, values, tops, offsets = [], [], [], []
    for item in items:
        text, _ = texts.get(item.token_id)
        tokens.append(text)
        values.append(item.logprob)
        tops.append({t: lp for t, _, lp in _top(texts, item, top)})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _top(texts: TokenTexts, item: TokenLogprob, top: int) -> list[tuple[str, list[int], float]]:
    return [(*texts.get(token_id), logprob) for token_id, logprob in item.top[:top]]
