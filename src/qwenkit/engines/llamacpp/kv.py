"""KV slots: which llama.cpp sequence ids are in use, and which finished sequences' cells are kept.

Contract: a running sequence owns one slot (its seq_id). When it ends, its cells stay as a prefix cache
for the next request that starts with the same tokens (a shared system prompt, earlier chat turns), until
the room is needed. Cell counts are upper bounds: shared cells count per slot. With per-sequence KV
buffers (not unified) each slot has its own n_ctx / n_slots cells, and llama.cpp splits a batch into one
compute pass per run of consecutive seq ids (in batch order): so a new sequence always gets the lowest slot
not running (lowest_available), keeping the running ids one run, and a prefix cached elsewhere is copied in.
On a recurrent (hybrid) model a slot's state cannot be cut back: an idle cache is reused only whole (the
prompt extends it), never copied from a running sequence. With a StateCache, an idle cache that is dropped,
or cut back to less than half, is first saved there (spilled), so a later turn can restore it instead of
prefilling again. A cache belongs to the LoRA adapter its cells were computed under (`space`, None for
the base model): it serves, and is saved for, prompts of that adapter only. Token lists may hold image
keys (image_tokens.py): cuts and length checks go through position_after, since an image's tokens do not
take one position each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenkit.engines.llamacpp.image_tokens import position_after
from qwenkit.engines.llamacpp.model import LlamaModel
from qwenkit.engines.llamacpp.state_cache import StateCache, StateHit, common_prefix


@dataclass
class _Cached:
    tokens: list[int]
    last_used: int
    space: str | None = None


@dataclass
class PrefixMatch:
    length: int
    slot: int
    idle: bool


@dataclass
class SlotManager:
    model: LlamaModel
    n_slots: int
    enabled: bool = True
    unified: bool = False
    states: StateCache | None = None
    spills: int = 0
    _free: list[int] = field(init=False)
    _idle: dict[int, _Cached] = field(init=False, default_factory=dict)
    _clock: int = 0

    def __post_init__(self) -> None:
        self._free = list(range(self.n_slots - 1, -1, -1))

    @property
    def idle_cells(self) -> int:
        return sum(len(c.tokens) for c in self._idle.values())

    def has_slot(self) -> bool:
        return bool(self._free) or bool(self._idle)

    def best_prefix(
        self, prompt: tuple[int, ...], running: dict[int, list[int]], space: str | None = None
    ) -> PrefixMatch | None:
        """The slot (idle cache of `space`, or a running sequence: the caller passes only those of the same
        space) sharing the longest prefix with this prompt."""
        if not self.enabled:
            return None
        best: PrefixMatch | None = None
        exact = self.model.recurrent
        for slot, cached in self._idle.items():
            if cached.space != space:
                continue
            n = common_prefix(cached.tokens, prompt)
            if exact and not n == len(cached.tokens) < len(prompt):
                continue  # its recurrent state holds more than the prompt shares, or all of the prompt
            if n and (best is None or n > best.length):
                best = PrefixMatch(n, slot, True)
        if exact:
            return best  # a running sequence's state moves on every step: never a source
        for slot, tokens in running.items():
            n = common_prefix(tokens, prompt)
            if n and (best is None or n > best.length):
                best = PrefixMatch(n, slot, False)
        return best

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Give dst src's cells before position n."""
        if self.unified:
            self.model.seq_cp(src, dst, 0, n)  # shared cells: nothing is copied
        else:
            # Across per-sequence buffers llama.cpp copies whole buffers only; then drop the tail.
            self.model.seq_cp(src, dst, -1, -1)
            self.model.seq_rm(dst, n, -1)

    def take_idle(self, slot: int, keep: int) -> int:
        """Reuse an idle slot: keep its first `keep` cells, drop the rest."""
        cached = self._idle.pop(slot)
        if keep < len(cached.tokens) // 2:
            # Most of it would be lost: likely another conversation taking the slot, so save it first.
            self._spill(slot, cached)
        if not self.model.seq_rm(slot, position_after(cached.tokens, keep), -1):
            raise RuntimeError(f"slot {slot} cannot be cut back to {keep} tokens (recurrent state)")
        return slot

    def restore(self, slot: int, hit: StateHit) -> bool:
        """Put a saved state into a slot just taken, cut back to hit.length; False leaves the slot empty."""
        if not self.model.state_set(slot, hit.data):
            return False
        cut = position_after(hit.tokens, hit.length)
        if hit.length < len(hit.tokens) and not self.model.seq_rm(slot, cut, -1):
            self.model.seq_rm(slot)
            return False
        return True

    def save(self, slot: int, tokens: list[int], recent: bool = True, space: str | None = None) -> bool:
        """Copy a slot's state (holding exactly `tokens`) into the state cache, when one is kept."""
        key = tuple(tokens)
        if self.states is None or not key or self.states.holds(key, space):
            return False
        if not self.states.fits(self.model.state_size(slot)):
            return False
        return self.states.put(key, self.model.state_get(slot), recent=recent, space=space)

    def _spill(self, slot: int, cached: _Cached) -> None:
        """Save an idle cache to the state cache before its cells are dropped. On recurrent models it
        serves only a prompt that repeats it exactly (a next turn re-renders the answer differently), so it
        goes in as the first to evict: it must not push out the turn-boundary snapshots."""
        if self.save(slot, cached.tokens, recent=not self.model.recurrent, space=cached.space):
            self.spills += 1

    def lowest_available(self) -> int:
        """The lowest slot no running sequence holds (free, or idle with a cache that may be dropped)."""
        return min([*self._free, *self._idle])

    def take(self, slot: int) -> int:
        """Take an available slot for a new sequence, dropping its idle cache if it has one."""
        cached = self._idle.pop(slot, None)
        if cached is not None:
            self._spill(slot, cached)
            self.model.seq_rm(slot)
        else:
            self._free.remove(slot)
        return slot

    def is_idle(self, slot: int) -> bool:
        return slot in self._idle

    def evict_lru(self, keep: int | None = None) -> bool:
        """Drop the least recently used idle cache (never `keep`); False when there is none to drop."""
        candidates = [s for s in self._idle if s != keep]
        if not candidates:
            return False
        slot = min(candidates, key=lambda s: self._idle[s].last_used)
        self._spill(slot, self._idle.pop(slot))
        self.model.seq_rm(slot)
        self._free.append(slot)
        return True

    def release(self, slot: int, cached_tokens: list[int], space: str | None = None) -> None:
        """A sequence ended: keep its cells for prefix reuse (or drop them when caching is off)."""
        self._clock += 1
        # Memory must hold exactly these tokens (a failed decode may leave it elsewhere): else drop it.
        held = position_after(cached_tokens, len(cached_tokens))
        if self.enabled and cached_tokens and self.model.seq_len(slot) == held:
            self._idle[slot] = _Cached(cached_tokens, self._clock, space)
        else:
            self.model.seq_rm(slot)
            self._free.append(slot)

    def drop(self, slot: int) -> None:
        """Free a slot and its cells now (preemption, errors)."""
        self.model.seq_rm(slot)
        self._free.append(slot)
