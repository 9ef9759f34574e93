"""Saved sequence states in host memory, keyed by the tokens they hold: a bounded LRU.

Contract: put(tokens, data) keeps one llama.cpp sequence state (its KV cells and, on hybrid models, its
recurrent state) that holds exactly `tokens`; the bytes held never exceed the budget (least recently used
entries go first; an entry larger than the whole budget is not kept). best(prompt, exact) finds the entry
that saves the most prefill for a prompt and always leaves at least one prompt token to feed: exact=True
(recurrent state, which cannot be cut back) only takes entries whose every token starts the prompt;
exact=False (attention only, cut back after restoring) takes any shared prefix. use(hit) marks the entry
chosen as recently used; put(..., recent=False) files a state as the first to evict. `space` keeps
apart states made under different LoRA adapters: best() only finds entries put in the same space.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StateHit:
    tokens: tuple[int, ...]  # the entry's key
    length: int  # prompt tokens it covers (after cutting back, when not exact)
    data: bytes
    space: str | None = None  # the LoRA adapter it was made under


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix; slice compares run in C, so long shared histories stay cheap."""
    a, b = tuple(a), tuple(b)
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class StateCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], bytes] = OrderedDict()
        self.hits = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: tuple[int, ...]) -> bool:
        return self.holds(tokens)

    def holds(self, tokens: tuple[int, ...], space: str | None = None) -> bool:
        return (space, tokens) in self._entries

    def keys(self) -> list[tuple[int, ...]]:
        """Keys (token tuples) from least to most recently used."""
        return [tokens for _, tokens in self._entries]

    def fits(self, size: int) -> bool:
        return 0 < size <= self.budget

    def put(
        self, tokens: tuple[int, ...], data: bytes, recent: bool = True, space: str | None = None
    ) -> bool:
        """Keep a state; False when it is larger than the whole budget (nothing is evicted then).
        recent=False files it as least recently used: the first to go when room is needed."""
        if not tokens or not self.fits(len(data)):
            return False
        key = (space, tokens)
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        while self._entries and self.bytes + len(data) > self.budget:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped)
            self.evictions += 1
        self._entries[key] = data
        if not recent:
            self._entries.move_to_end(key, last=False)
        self.bytes += len(data)
        return True

    def best(self, prompt: tuple[int, ...], exact: bool, space: str | None = None) -> StateHit | None:
        """The entry of `space` covering the longest prefix of prompt, leaving at least one token to feed."""
        best: StateHit | None = None
        for (entry_space, tokens), data in self._entries.items():
            if entry_space != space:
                continue
            if exact:
                n = len(tokens) if len(tokens) < len(prompt) and prompt[: len(tokens)] == tokens else 0
            else:
                n = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if n > 0 and (best is None or n > best.length):
                best = StateHit(tokens, n, data, space)
        return best

    def use(self, hit: StateHit) -> None:
        if (hit.space, hit.tokens) in self._entries:
            self._entries.move_to_end((hit.space, hit.tokens))
        self.hits += 1
