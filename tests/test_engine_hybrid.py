"""Multi-turn state reuse and hybrid (recurrent) memory in the llama.cpp engine.

The state cache and the recurrent rules are checked on the attention demo (qwen3), where the recurrent
rules are also forced on to prove the mechanism, and on the hybrid demos (qwen3_5, and qwen3_next through
llama.cpp's qwen3next graph: Gated DeltaNet layers whose state cannot be cut back): batched = solo, a reused
state gives the same tokens and logprobs as a fresh run without any cache, preemption and abort stay exact,
cached_tokens counts the reused tokens, the cache stays within its budget.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.llamacpp.state_cache import StateCache, common_prefix
from qwenkit.engines.request import GenerationRequest, TokenEvent
from qwenkit.engines.sampling import SamplingParams
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import MODEL, demo_app, demo_engine, in_process

ARCHES = ["qwen3", "qwen3_5", "qwen3_next"]
HYBRIDS = ("qwen3_5", "qwen3_next")
# Fixed-length greedy answers: EOS cannot end a turn early, so every turn has a known length.
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
LOGPROB_TOL = 1e-3  # the same tokens fed in other batch shapes round differently


def words(seed: int, n: int) -> list[int]:
    return [1000 + (seed * 7919 + i * 104729) % 100000 for i in range(n)]


class Chat:
    """Token-level chat turns in Qwen's layout: <|im_start|>role ... <|im_end|>\\n."""

    def __init__(self, eng: LlamaCppEngine) -> None:
        tok = eng.model.token_id
        self.start, self.end, self.nl = tok("<|im_start|>"), tok("<|im_end|>"), tok("\n")
        assert None not in (self.start, self.end, self.nl)

    def message(self, seed: int, n: int = 12) -> list[int]:
        return [self.start, *words(seed, n), self.end, self.nl]  # type: ignore[list-item]

    def generation(self) -> list[int]:
        return [self.start, *words(999, 2)]  # type: ignore[list-item]


def make(gguf: Path, **kw: object) -> LlamaCppEngine:
    base: dict[str, object] = {"n_ctx": 2048, "max_seqs": 4, "threads": 2}
    return LlamaCppEngine(gguf, EngineConfig(**(base | kw)))  # type: ignore[arg-type]


def run(
    eng: LlamaCppEngine, rid: str, prompt: list[int], sampling: SamplingParams = GREEDY
) -> tuple[list[int], list[list[tuple[int, float]]], TokenEvent]:
    events = list(
        eng.generate_sync(GenerationRequest(rid, tuple(prompt), sampling, ignore_eos=True, logprobs=5))
    )
    tokens = [t for ev in events for t in ev.token_ids]
    tops = [list(lp.top) for ev in events for lp in ev.logprobs or []]
    return tokens, tops, events[-1]


def assert_same(a: list[list[tuple[int, float]]], b: list[list[tuple[int, float]]]) -> None:
    assert len(a) == len(b)
    for top_a, top_b in zip(a, b, strict=True):
        assert [t for t, _ in top_a] == [t for t, _ in top_b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(top_a, top_b, strict=True)) < LOGPROB_TOL


def run_both(
    eng: LlamaCppEngine, fresh: LlamaCppEngine, rid: str, prompt: list[int]
) -> tuple[list[int], TokenEvent]:
    """Run on the engine under test and on the cacheless reference: same tokens, same logprobs."""
    tokens, tops, event = run(eng, rid, prompt)
    ref, ref_tops, _ = run(fresh, rid, prompt)
    assert tokens == ref
    assert_same(tops, ref_tops)
    return tokens, event


def submit_all(
    eng: LlamaCppEngine, prompts: list[list[int]], sampling: SamplingParams = GREEDY
) -> dict[int, list[int]]:
    """Queue every prompt at once (no steps run yet); the tokens each gets are collected as they come."""
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        eng.submit(
            GenerationRequest(f"all{i}", tuple(p), sampling, ignore_eos=True),
            lambda ev, i=i: got[i].extend(ev.token_ids),  # type: ignore[misc]
        )
    return got


@pytest.fixture(scope="module", params=ARCHES)
def gguf(request: pytest.FixtureRequest, demo_gguf: Callable[..., Path]) -> Path:
    return demo_gguf(request.param, "tiny", "f32")


@pytest.fixture(scope="module")
def fresh(gguf: Path) -> Iterator[LlamaCppEngine]:
    """The reference: no prefix cache, no state cache, every prompt prefilled from scratch."""
    eng = make(gguf, prefix_cache=False, state_cache_mb=0)
    yield eng
    eng.close()


# ---- the cache itself ----------------------------------------------------------------------------
def test_common_prefix_matches_a_plain_scan() -> None:
    rng = random.Random(3)
    for _ in range(300):
        a = [rng.randrange(3) for _ in range(rng.randrange(12))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(4))]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert common_prefix(a, b) == n == common_prefix(tuple(b), a)


def test_state_cache_is_a_bounded_lru() -> None:
    cache = StateCache(100)
    assert cache.put((1, 2), b"x" * 40) and cache.put((1, 2, 3), b"y" * 40)
    cache.use(cache.best((1, 2, 9), exact=True))  # type: ignore[arg-type]
    assert cache.put((7,), b"z" * 40)  # over budget: the least recently used (1, 2, 3) goes
    assert cache.keys() == [(1, 2), (7,)] and cache.bytes == 80 and cache.evictions == 1
    assert not cache.put((8,), b"w" * 101)  # larger than the whole budget: refused, nothing evicted
    assert cache.keys() == [(1, 2), (7,)]
    assert cache.put((1, 2), b"v" * 100) and cache.keys() == [(1, 2)] and cache.bytes == 100


def test_a_state_put_as_not_recent_is_the_first_to_go() -> None:
    cache = StateCache(100)
    assert cache.put((1,), b"a" * 30) and cache.put((2,), b"b" * 30)
    assert cache.put((3,), b"c" * 30, recent=False)
    assert cache.keys() == [(3,), (1,), (2,)]
    assert cache.put((4,), b"d" * 30)  # over budget: the one filed as least recent goes, not (1,)
    assert cache.keys() == [(1,), (2,), (4,)]


def test_spilled_final_states_of_a_hybrid_go_before_its_turn_snapshots(gguf: Path) -> None:
    """A recurrent model's idle slot (prompt + answer) serves only an exact repeat, while the snapshot at the
    last message start serves the next turn: the spilled state is filed as the first to evict."""
    eng = make(gguf, max_seqs=1, state_cache_mb=64)
    try:
        chat = Chat(eng)
        first = chat.message(60) + chat.generation()
        answer, _, _ = run(eng, "a", first)
        run(eng, "b", chat.message(61) + chat.generation())  # takes the slot: a's final state is spilled
        assert eng.states is not None
        spilled = tuple(first + answer[:-1])  # the last sampled token was never fed
        assert spilled in eng.states
        if eng.model.recurrent:  # behind both chats' snapshots, though it was saved last
            assert len(eng.states) == 3 and eng.states.keys()[0] == spilled
        else:  # an attention cache is cut back to any prefix: it is filed as recent as any state
            assert eng.states.keys()[-1] == spilled
    finally:
        eng.close()


def test_state_cache_lookup_exact_and_cut_back() -> None:
    cache = StateCache(1000)
    cache.put((1, 2, 3, 4), b"a")
    cache.put((1, 2), b"b")
    # Exact (recurrent): only entries the prompt extends; one prompt token is always left to feed.
    assert cache.best((1, 2, 3, 4, 5), exact=True).length == 4  # type: ignore[union-attr]
    assert cache.best((1, 2, 3, 9), exact=True).tokens == (1, 2)  # type: ignore[union-attr]
    assert cache.best((1, 2, 3, 4), exact=True).tokens == (1, 2)  # type: ignore[union-attr]
    assert cache.best((1, 2), exact=True) is None
    # Cut back (attention only): any shared prefix.
    hit = cache.best((1, 2, 3, 9), exact=False)
    assert hit is not None and hit.tokens == (1, 2, 3, 4) and hit.length == 3
    assert cache.best((1, 2, 3, 4), exact=False).length == 3  # type: ignore[union-attr]
    assert cache.best((5,), exact=False) is None


# ---- the engine ----------------------------------------------------------------------------------
def test_the_hybrid_demo_is_recurrent(gguf: Path, fresh: LlamaCppEngine) -> None:
    assert fresh.model.recurrent == gguf.name.startswith(HYBRIDS)
    if fresh.model.recurrent:  # the reason for all of this: its state cannot be cut back
        chat = Chat(fresh)
        msg, slot = chat.message(2), 0  # slot 0 is free: this engine keeps no caches
        n = len(msg)
        assert fresh.model.decode(msg, range(n), [slot] * n, [False] * (n - 1) + [True]) == 0
        assert not fresh.model.seq_rm(slot, 8, -1) and fresh.model.seq_len(slot) == n
        assert fresh.model.seq_rm(slot) and fresh.model.seq_len(slot) == 0


def test_batched_equals_solo(gguf: Path, fresh: LlamaCppEngine) -> None:
    chat = Chat(fresh)
    prompts = [chat.message(s, 8 + 5 * s) + chat.generation() for s in range(3)]
    solo = [run(fresh, f"solo{i}", p)[0] for i, p in enumerate(prompts)]
    got = submit_all(fresh, prompts)
    while fresh.step():
        pass
    assert [got[i] for i in range(3)] == solo


@pytest.mark.parametrize("forced_recurrent", [False, True])
def test_next_turn_restores_the_state_and_prefills_only_new_tokens(
    gguf: Path, fresh: LlamaCppEngine, forced_recurrent: bool
) -> None:
    eng = make(gguf, state_cache_mb=64)
    try:
        if forced_recurrent:
            if eng.model.recurrent:
                pytest.skip("the hybrid model is recurrent already")
            eng.model.recurrent = True  # the attention model under the recurrent rules: they must hold
        chat = Chat(eng)
        history = chat.message(1) + chat.message(2)
        turn1 = history + chat.generation()
        answer1, ev1 = run_both(eng, fresh, "t1", turn1)
        assert ev1.cached_tokens == 0
        if eng.model.recurrent:  # its state was saved where its last message starts
            assert tuple(turn1[: len(history)]) in eng.states  # type: ignore[operator]

        # Turn 2 repeats turn 1 and its answer: the idle slot holds all but the last answer token.
        turn2 = turn1 + answer1 + [chat.end, chat.nl] + chat.message(3) + chat.generation()
        _, ev2 = run_both(eng, fresh, "t2", turn2)
        assert ev2.cached_tokens == len(turn1) + len(answer1) - 1

        # The template re-rendered turn 1's answer (thinking dropped): only the history before turn 1's
        # generation prompt is shared. A recurrent model restores the state saved there.
        turn2b = history + chat.message(4) + chat.message(5) + chat.generation()
        answer2b, ev2b = run_both(eng, fresh, "t2b", turn2b)
        assert (
            ev2b.cached_tokens == len(history) if eng.model.recurrent else ev2b.cached_tokens > len(history)
        )

        # The slot's cells are gone (another request took them): the state comes back from the cache.
        while eng.scheduler.slots.evict_lru():
            pass
        assert eng.scheduler.slots.spills >= 1
        turn3 = turn2b + answer2b + [chat.end, chat.nl] + chat.message(6) + chat.generation()
        _, ev3 = run_both(eng, fresh, "t3", turn3)
        assert ev3.cached_tokens == len(turn2b) + len(answer2b) - 1
    finally:
        eng.close()


def test_abort_leaves_an_exact_state_and_a_rerun_matches(gguf: Path, fresh: LlamaCppEngine) -> None:
    eng = make(gguf, state_cache_mb=64)
    try:
        chat = Chat(eng)
        p = chat.message(7) + chat.generation()
        long = SamplingParams(temperature=0.0, max_tokens=200)
        events: list[TokenEvent] = []
        eng.submit(GenerationRequest("ab", tuple(p), long, ignore_eos=True), events.append)
        for _ in range(6):
            eng.step()
        eng.abort("ab")
        eng.step()
        assert events[-1].finish_reason == "abort"
        partial = [t for ev in events for t in ev.token_ids]
        assert 0 < len(partial) < 200
        # A prompt extending what the aborted run had fed reuses all of it.
        more = p + partial + [chat.end, chat.nl] + chat.message(8) + chat.generation()
        _, ev = run_both(eng, fresh, "more", more)
        assert ev.cached_tokens == len(p) + len(partial) - 1
        run_both(eng, fresh, "again", p)  # the same prompt again: nothing of the aborted run leaks into it
    finally:
        eng.close()


def test_preemption_recomputes_exactly(gguf: Path, fresh: LlamaCppEngine) -> None:
    eng = make(gguf, n_ctx=256, kv_unified=True, state_cache_mb=64)
    try:
        chat = Chat(eng)
        sampling = SamplingParams(temperature=0.0, max_tokens=90)
        prompts = [chat.message(20 + i, 26) + chat.generation() for i in range(4)]
        solo = [run(fresh, f"solo{i}", p, sampling)[0] for i, p in enumerate(prompts)]
        got = submit_all(eng, prompts, sampling)
        while eng.step():
            assert eng.stats().kv_used <= 256
        assert eng.stats().preemptions > 0
        assert [got[i] for i in range(4)] == solo
    finally:
        eng.close()


def test_state_cache_stays_within_its_budget(gguf: Path) -> None:
    eng = make(gguf, max_seqs=2, state_cache_mb=1)
    try:
        chat = Chat(eng)
        conversations = [chat.message(40 + i, 30) for i in range(8)]
        run(eng, "probe", conversations[0] + chat.generation())
        eng.scheduler.slots.evict_lru()
        # Its final state, spilled; a recurrent model also saved the state where its last message starts.
        assert eng.states is not None and len(eng.states) == (2 if eng.model.recurrent else 1)
        entry = eng.states.bytes // len(eng.states)
        eng.states.budget = 3 * entry + entry // 2  # room for about three states
        for turn in range(2):
            for i, history in enumerate(conversations):
                prompt = history + chat.generation()
                answer, _, ev = run(eng, f"c{i}t{turn}", prompt)
                if turn:  # its own state was evicted by the seven others' (only <|im_start|> is shared)
                    assert ev.cached_tokens <= 1
                conversations[i] = prompt + answer + [chat.end, chat.nl] + chat.message(50 + i, 4)
                assert eng.states.bytes <= eng.states.budget
        assert eng.states.evictions > 0 and len(eng.states) >= 2
    finally:
        eng.close()


def test_served_chat_reports_the_reused_tokens_of_the_previous_turn(
    demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]
) -> None:
    # One slot: the unrelated chat in between takes it, so turn 2 gets its prefix from the state cache.
    engine = demo_engine(demo_gguf("qwen3", "tiny", "f32"), n_ctx=2048, max_seqs=1)
    tokenizer = QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))
    try:
        with in_process(demo_app(engine, tokenizer)) as client:

            def chat(messages: list[dict[str, str]]) -> dict:  # type: ignore[type-arg]
                body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
                response = client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()

            history = [{"role": "user", "content": "Tell me about the history of the Roman roads. " * 4}]
            first = chat(history)
            assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            other = chat([{"role": "user", "content": "Something else entirely"}])
            history += [
                {"role": "assistant", "content": first["choices"][0]["message"]["content"] or "ok"},
                {"role": "user", "content": "And the aqueducts?"},
            ]
            second = chat(history)
            cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
            # Everything up to turn 1's generation prompt ("<|im_start|>assistant\n") was reused.
            assert first["usage"]["prompt_tokens"] - 3 <= cached < second["usage"]["prompt_tokens"]
            # /metrics shows the reuse and the state cache that made it.
            metrics = {
                line.split()[0]: float(line.split()[1])
                for line in client.get("/metrics").text.splitlines()
                if line.startswith("qwenkit_")
            }
            reused = cached + other["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert metrics["qwenkit_prompt_cached_tokens_total"] == reused
            assert metrics["qwenkit_state_cache_hits_total"] >= 1
            assert metrics["qwenkit_state_cache_entries"] >= 1
            assert 0 < metrics["qwenkit_state_cache_bytes"] <= 64 * 1024 * 1024
    finally:
        engine.close()
