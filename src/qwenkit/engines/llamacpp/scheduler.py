"""Continuous batching: which sequences run, and how many tokens each feeds into the next decode call.

Contract: admit() moves waiting sequences into KV slots while room allows, reusing the longest cached
prefix: an idle or running slot's cells, or a saved state from the StateCache (restored into the slot);
on recurrent models only a state holding exactly a prefix of the prompt counts. plan() builds one step:
every decoding sequence's next token first, then prompt tokens up to prefill_budget(n_decode, n_prefilling)
(n_batch when none decodes), oldest prompt first, so a long prompt is fed in pieces and never stalls the
running streams for long; a chunk ends at the sequence's snapshot_at so its state can be saved.
With LoRA adapters (group), a step serves one adapter group only (llama.cpp applies adapters per context):
group(running) picks it; a prefix or saved state is reused only within the same adapter.
When the KV cells run out, the newest running sequence is preempted (its cells freed, re-queued first,
recomputed later) rather than failing anyone. Images: prefix matches compare image keys (the image's
hash), a reused prefix never ends inside an image, and a sequence feeds at most one text or image run per
step (Sequence.next_run); one waiting for its image's encode is skipped until the embeddings are there.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from qwenkit.engines.llamacpp.image_tokens import image_boundary, position_after
from qwenkit.engines.llamacpp.kv import SlotManager
from qwenkit.engines.llamacpp.sequence import Sequence, Status


@dataclass
class StepPlan:
    entries: list[tuple[Sequence, int]]  # (sequence, tokens it feeds this step)

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.entries)


class Scheduler:
    def __init__(
        self,
        slots: SlotManager,
        n_ctx: int,
        n_batch: int,
        max_seqs: int,
        prefill_budget: Callable[[int, int], int] = lambda n_decode, n_prefilling: 64 * n_prefilling,
        group: Callable[[list[Sequence]], list[Sequence]] | None = None,
    ) -> None:
        self.slots = slots
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.max_seqs = max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Prompt tokens of a step for all prefilling sequences beside n decodes (StepCosts.budget).
        self.prefill_budget = prefill_budget
        self.group = group  # the running sequences one step may serve together (one LoRA adapter)
        self.last_prefill_budget = 0  # what the last plan with a prompt in it allowed (for reports)
        self.preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_used(self) -> int:
        return sum(s.n_cached for s in self.running) + self.slots.idle_cells

    def _over(self, extra: int) -> bool:
        # Per-sequence buffers cannot overflow: submit() caps each request at its buffer's size.
        return self.slots.unified and self.kv_used() + extra > self.n_ctx

    def admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_seqs and self.slots.has_slot():
            seq = self.waiting[0]
            prompt = tuple(seq.tokens)
            space = seq.request.adapter
            running = {s.seq_id: s.tokens[: s.n_cached] for s in self.running if s.request.adapter == space}
            match = self.slots.best_prefix(prompt, running, space)
            # At least one token must be fed so the step yields logits to sample from.
            reuse = min(match.length, len(prompt) - 1) if match else 0
            states = self.slots.states
            hit = states.best(prompt, self.slots.model.recurrent, space) if states is not None else None
            if hit is not None and hit.length > reuse:
                match, reuse = None, hit.length
            else:
                hit = None
            cut = image_boundary(prompt, reuse)  # an image's cells share a position: never cut inside one
            if cut != reuse:
                whole = self.slots.model.recurrent and (hit is not None or (match is not None and match.idle))
                reuse = 0 if whole else cut  # a recurrent state cannot be cut back at all
                if hit is not None:
                    hit = dataclasses.replace(hit, length=reuse) if reuse else None
            # A restored state brings its cells with it; a reused slot's cells are already counted.
            need = len(prompt) - reuse + len(self.running) + 1 + (reuse if hit else 0)
            keep = match.slot if match and match.idle else None
            while self._over(need) and self.slots.evict_lru(keep=keep):
                pass
            if self._over(need):
                break
            self.waiting.popleft()
            slot = self.slots.lowest_available()
            if hit is not None:
                seq.seq_id = self.slots.take(slot)
                if self.slots.restore(slot, hit):
                    states.use(hit)  # type: ignore[union-attr]
                else:
                    reuse = 0
            elif match and reuse and match.idle and match.slot == slot:
                seq.seq_id = self.slots.take_idle(slot, reuse)
            else:
                seq.seq_id = self.slots.take(slot)
                if match and reuse:
                    self.slots.copy_prefix(match.slot, slot, position_after(prompt, reuse))
            seq.n_cached = reuse
            if seq.n_generated == 0:
                seq.cached_prompt = reuse
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> StepPlan:
        entries: list[tuple[Sequence, int]] = []
        budget = self.n_batch
        running = self.group(self.running) if self.group is not None else self.running
        decoding = [s for s in running if s.pending == 1]
        for seq in decoding:
            entries.append((seq, 1))
        budget -= len(decoding)
        # While others decode, prompts get a budget per step so the streams' next tokens are not delayed
        # much; the oldest prompt is served first, so queued prompts finish one by one, not all at the end.
        prefilling = sum(1 for s in running if s.pending > 1)
        prefill_budget = min(budget, self.prefill_budget(len(decoding), prefilling)) if decoding else budget
        if prefilling:
            self.last_prefill_budget = prefill_budget
        for seq in running:
            if seq.pending > 1 and prefill_budget > 0:
                n = seq.next_run(min(seq.pending, prefill_budget))
                if seq.n_cached < seq.snapshot_at < seq.n_cached + n:
                    n = seq.snapshot_at - seq.n_cached
                if n:
                    entries.append((seq, n))
                    prefill_budget -= n
        plan = StepPlan(entries)
        while plan.entries and self._over(plan.n_tokens):
            if self.slots.evict_lru():
                continue
            victim = self.preempt_newest()
            if victim is None:
                break
            plan = StepPlan([(s, n) for s, n in plan.entries if s is not victim])
        return plan

    def preempt_newest(self) -> Sequence | None:
        """Free the newest running sequence's cells and queue it first; it resumes by recomputing."""
        if len(self.running) <= 1:
            return None
        victim = max(self.running, key=lambda s: s.arrival)
        self.running.remove(victim)
        self.slots.drop(victim.seq_id)
        victim.seq_id = -1
        victim.n_cached = 0
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        self.preemptions += 1
        return victim

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.slots.release(seq.seq_id, seq.tokens[: seq.n_cached], seq.request.adapter)
            seq.seq_id = -1
        elif seq in self.waiting:
            self.waiting.remove(seq)
