"""The llama.cpp engine: continuous batching, sampling, stops, aborts, prefix reuse, thinking, grammar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import pytest

from qwenkit.engines.grammar import grammar_from_json_schema
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.llamacpp.sampler import SeqSampler
from qwenkit.engines.request import (
    THINKING_EARLY_STOP,
    EngineError,
    GenerationRequest,
    GrammarError,
    RequestTooLong,
    ThinkingControl,
    TokenEvent,
)
from qwenkit.engines.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def engine(demo_gguf: Callable[..., Path]) -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=2048, max_seqs=4, threads=2))
    yield eng
    eng.close()


def prompt(seed: int, n: int = 12) -> tuple[int, ...]:
    return tuple(1000 + (seed * 7919 + i * 104729) % 100000 for i in range(n))


def run(engine: LlamaCppEngine, request: GenerationRequest) -> tuple[list[int], str, TokenEvent]:
    events = list(engine.generate_sync(request))
    tokens = [t for ev in events for t in ev.token_ids]
    return tokens, "".join(ev.text for ev in events), events[-1]


def req(rid: str, p: tuple[int, ...], sampling: SamplingParams = GREEDY, **kw: object) -> GenerationRequest:
    return GenerationRequest(rid, p, sampling, **kw)  # type: ignore[arg-type]


def test_greedy_is_deterministic_and_counts_tokens(engine: LlamaCppEngine) -> None:
    a, text_a, last = run(engine, req("g1", prompt(1)))
    b, text_b, _ = run(engine, req("g2", prompt(1)))
    assert a == b and text_a == text_b
    assert len(a) == 24 and last.finish_reason == "length"
    assert last.completion_tokens == 24 and last.prompt_tokens == 12


def test_same_seed_same_output_different_seed_differs(engine: LlamaCppEngine) -> None:
    def sampled(seed: int, rid: str) -> list[int]:
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=seed, max_tokens=24)
        return run(engine, req(rid, prompt(2), params))[0]

    assert sampled(7, "s1") == sampled(7, "s2")
    assert sampled(7, "s3") != sampled(8, "s4")


def test_batched_sequences_match_their_solo_runs(engine: LlamaCppEngine) -> None:
    prompts = [prompt(10 + i, 8 + 5 * i) for i in range(4)]
    solo = [run(engine, req(f"solo{i}", p))[0] for i, p in enumerate(prompts)]
    got: dict[int, list[int]] = {i: [] for i in range(4)}
    for i, p in enumerate(prompts):
        engine.submit(req(f"batch{i}", p), lambda ev, i=i: got[i].extend(ev.token_ids))
    max_running = 0
    while engine.step():
        max_running = max(max_running, engine.stats().running)
    assert max_running == 4  # they really ran together
    assert [got[i] for i in range(4)] == solo


def test_greedy_fast_path_picks_what_the_native_greedy_sampler_picks(
    engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs: list[tuple[int, int]] = []
    fast_sample = SeqSampler.sample

    def checked(self: SeqSampler, index: int) -> int:
        token = fast_sample(self, index)
        assert self.argmax  # plain greedy takes the fast path
        pairs.append((token, llama_cpp.llama_sampler_sample(self._free, self._model.ctx, index)))
        return token

    monkeypatch.setattr(SeqSampler, "sample", checked)
    for i in range(4):
        engine.submit(req(f"fast{i}", prompt(40 + i, 6 + 3 * i)), lambda ev: None)
    while engine.step():
        pass
    assert len(pairs) == 4 * 24
    assert all(fast == native for fast, native in pairs)


@pytest.mark.parametrize(
    "penalty", [{"repetition_penalty": 1.5}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}]
)
def test_penalties_run_in_the_native_chain_and_change_repeats(
    engine: LlamaCppEngine, penalty: dict[str, float]
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=48, **penalty)  # type: ignore[arg-type]
    sampler = SeqSampler(engine.model, params, None, grammar_active=False)
    assert not sampler.argmax  # penalties need the chain's token history
    sampler.free()
    plain, _, _ = run(engine, req("pen0", prompt(50), SamplingParams(temperature=0.0, max_tokens=48)))
    penalized, _, last = run(engine, req("pen1", prompt(50), params))
    assert last.finish_reason == "length" and len(penalized) == 48
    assert penalized != plain
    assert len(set(penalized)) >= len(set(plain))


def test_stop_string_cuts_text_and_finishes(engine: LlamaCppEngine) -> None:
    _, text, _ = run(engine, req("st1", prompt(3)))
    assert len(text) > 8
    stop = text[5:8]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop])
    _, cut, last = run(engine, req("st2", prompt(3), params))
    assert last.finish_reason == "stop"
    assert cut == text[: text.index(stop)]


def test_stop_token_ids_and_ignore_eos(engine: LlamaCppEngine) -> None:
    tokens, _, _ = run(engine, req("e1", prompt(4)))
    _, text, last = run(engine, req("e2", prompt(4), stop_token_ids=frozenset({tokens[0]})))
    assert last.finish_reason == "stop" and last.completion_tokens == 1 and text == ""


def test_abort_frees_the_sequence(engine: LlamaCppEngine) -> None:
    events: list[TokenEvent] = []
    engine.submit(req("ab", prompt(5), SamplingParams(temperature=0.0, max_tokens=500)), events.append)
    for _ in range(5):
        engine.step()
    assert engine.stats().running == 1
    engine.abort("ab")
    engine.step()
    assert events[-1].finish_reason == "abort"
    assert engine.stats().running == 0
    assert 0 < events[-1].completion_tokens < 500


def test_prefix_reuse_gives_same_output(engine: LlamaCppEngine) -> None:
    shared = prompt(6, 40)
    first, _, ev1 = run(engine, req("p1", (*shared, 5, 6, 7)))
    second, _, ev2 = run(engine, req("p2", (*shared, 5, 6, 7)))
    _, _, ev3 = run(engine, req("p3", (*shared, 8, 9)))
    assert ev1.cached_tokens < 40 and ev2.cached_tokens == 42 and ev3.cached_tokens >= 40
    assert first == second


@pytest.mark.parametrize("unified", [False, True])
def test_prefix_copied_from_a_running_sequence(demo_gguf: Callable[..., Path], unified: bool) -> None:
    eng = LlamaCppEngine(
        demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=1024, max_seqs=2, threads=2, kv_unified=unified)
    )
    try:
        shared = prompt(13, 50)
        solo, _, _ = run(eng, req("solo", (*shared, 1, 2)))
        eng.scheduler.slots.evict_lru()  # forget the idle cache: the prefix must come from the running one
        first: list[TokenEvent] = []
        eng.submit(req("long", (*shared, 3), SamplingParams(temperature=0.0, max_tokens=200)), first.append)
        for _ in range(3):
            eng.step()
        events = list(eng.generate_sync(req("copy", (*shared, 1, 2))))
        assert events[-1].cached_tokens == 50
        assert [t for ev in events for t in ev.token_ids] == solo
        eng.abort("long")
        eng.step()
    finally:
        eng.close()


def test_new_sequences_take_the_lowest_slot_and_idle_prefixes_are_copied_there(
    demo_gguf: Callable[..., Path],
) -> None:
    # Per-sequence KV: llama.cpp decodes each run of consecutive seq ids in its own pass, so running
    # sequences must sit in the lowest slots; a cached prefix in a higher slot is copied down.
    eng = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=1024, max_seqs=4, threads=2))
    try:
        long = SamplingParams(temperature=0.0, max_tokens=100)
        shared = prompt(21, 30)
        solo, _, _ = run(eng, req("solo", (*shared, 1)))  # its cache stays idle in slot 0
        for i in range(3):
            eng.submit(req(f"bg{i}", prompt(30 + i), long), lambda ev: None)
        eng.step()
        assert sorted(s.seq_id for s in eng.scheduler.running) == [0, 1, 2]  # slot 0's cache was dropped
        eng.abort("bg1")
        eng.step()
        eng.submit(req("filler", prompt(40), long), lambda ev: None)
        eng.step()
        running = {s.request_id: s.seq_id for s in eng.scheduler.running}
        assert running["filler"] == 1  # the hole, not the free slot 3
        # A prefix cached in a high slot: run one there, let it finish, then ask again.
        hi = list(eng.generate_sync(req("hi", (*shared, 1), SamplingParams(temperature=0.0, max_tokens=2))))
        assert hi[-1].finished and eng.scheduler.slots.is_idle(3)
        eng.abort("bg2")
        eng.step()
        events = list(eng.generate_sync(req("again", (*shared, 1))))
        assert events[-1].cached_tokens == 30
        assert [t for ev in events for t in ev.token_ids] == solo
        for rid in ("bg0", "filler"):
            eng.abort(rid)
        eng.step()
    finally:
        eng.close()


def test_chunked_prefill_equals_whole_prefill(demo_gguf: Callable[..., Path]) -> None:
    long_prompt = prompt(7, 300)
    results = []
    for chunk in (16, None):
        eng = LlamaCppEngine(
            demo_gguf("qwen3", "tiny", "f32"),
            EngineConfig(n_ctx=1024, max_seqs=2, threads=2, prefill_chunk=chunk, prefix_cache=False),
        )
        try:
            other: list[TokenEvent] = []
            eng.submit(
                req("short", prompt(8), SamplingParams(temperature=0.0, max_tokens=60)),
                other.append,
            )
            eng.step()
            eng.step()  # the short one is decoding now
            events: list[TokenEvent] = []
            eng.submit(req("long", long_prompt), events.append)
            steps_with_both = 0
            while eng.step():
                if eng.stats().running == 2:
                    steps_with_both += 1
            results.append([t for ev in events for t in ev.token_ids])
            if chunk == 16:
                assert steps_with_both >= 300 // 16  # the prompt went in chunks while the other decoded
            assert sum(len(e.token_ids) for e in other) == 60
        finally:
            eng.close()
    assert results[0] == results[1]


def test_preemption_when_kv_runs_out(demo_gguf: Callable[..., Path]) -> None:
    config = EngineConfig(n_ctx=256, max_seqs=4, threads=2, kv_unified=True)
    eng = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), config)
    try:
        solo = [
            run(eng, req(f"solo{i}", prompt(20 + i, 30), SamplingParams(temperature=0.0, max_tokens=90)))[0]
            for i in range(4)
        ]
        got: dict[int, list[int]] = {i: [] for i in range(4)}
        finals: dict[int, TokenEvent] = {}

        def sink(i: int) -> Callable[[TokenEvent], None]:
            def f(ev: TokenEvent) -> None:
                got[i].extend(ev.token_ids)
                if ev.finished:
                    finals[i] = ev

            return f

        for i in range(4):
            eng.submit(
                req(f"pre{i}", prompt(20 + i, 30), SamplingParams(temperature=0.0, max_tokens=90)), sink(i)
            )
        while eng.step():
            assert eng.stats().kv_used <= 256
        assert eng.stats().preemptions > 0
        assert all(finals[i].finish_reason == "length" for i in range(4))
        assert [got[i] for i in range(4)] == solo  # recomputed sequences continue exactly
    finally:
        eng.close()


def test_bad_requests_are_refused_and_engine_keeps_serving(engine: LlamaCppEngine) -> None:
    with pytest.raises(EngineError, match="empty prompt"):
        engine.submit(req("x1", ()), lambda ev: None)
    with pytest.raises(RequestTooLong, match="exceeds the context"):
        engine.submit(req("x2", prompt(1, 3000)), lambda ev: None)
    with pytest.raises(RequestTooLong):
        engine.submit(req("x3", prompt(1), SamplingParams(max_tokens=5000)), lambda ev: None)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.submit(req("x4", (1, 2, 10**7)), lambda ev: None)
    with pytest.raises(GrammarError):
        engine.submit(req("x5", prompt(1), grammar=_bad_grammar()), lambda ev: None)
    with pytest.raises(EngineError, match="logprobs"):
        engine.submit(req("x6", prompt(1), logprobs=99), lambda ev: None)
    tokens, _, last = run(engine, req("ok", prompt(1)))
    assert len(tokens) == 24 and last.finish_reason == "length"


def _bad_grammar():
    from qwenkit.engines.request import Grammar

    return Grammar(gbnf="root ::= undefined-rule")


def test_json_schema_grammar_gives_valid_json(engine: LlamaCppEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
    }
    grammar = grammar_from_json_schema(schema, after_think=False)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=200)
    _, text, last = run(engine, req("j1", prompt(9), params, grammar=grammar))
    assert last.finish_reason == "stop"
    value = json.loads(text)
    assert isinstance(value["n"], int) and isinstance(value["ok"], bool)


def test_thinking_budget_forces_the_answer_and_grammar_waits_for_it(engine: LlamaCppEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=300, thinking_budget=6)
    request = req(
        "t1",
        prompt(11),
        params,
        thinking=ThinkingControl(starts_inside=True, budget=6),
        grammar=grammar_from_json_schema(schema),
    )
    _, text, last = run(engine, request)
    reasoning, sep, answer = text.partition("</think>")
    assert sep and THINKING_EARLY_STOP.strip() in (reasoning + sep).strip()
    assert isinstance(json.loads(answer)["a"], int)
    assert last.finish_reason == "stop"


def test_logprobs_are_log_probabilities_of_the_chosen_tokens(engine: LlamaCppEngine) -> None:
    events = list(
        engine.generate_sync(req("lp", prompt(12), SamplingParams(temperature=0.0, max_tokens=5), logprobs=3))
    )
    lps = [lp for ev in events for lp in ev.logprobs or []]
    assert len(lps) == 5
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.token_id == lp.top[0][0]  # greedy picks the most likely token


def test_async_generate_serves_concurrent_requests_and_early_exit_aborts(
    demo_gguf: Callable[..., Path],
) -> None:
    eng = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=2048, max_seqs=8, threads=2))
    eng.start()

    async def collect(i: int) -> list[int]:
        out: list[int] = []
        async for ev in eng.generate(
            req(f"a{i}", prompt(30 + i), SamplingParams(temperature=0.0, max_tokens=16))
        ):
            out.extend(ev.token_ids)
        return out

    async def leave_early() -> None:
        agen = eng.generate(req("early", prompt(40), SamplingParams(temperature=0.0, max_tokens=200)))
        async for _ in agen:
            break
        await agen.aclose()

    async def main() -> list[list[int]]:
        results = await asyncio.gather(*(collect(i) for i in range(8)), leave_early())
        return list(results[:8])

    try:
        outs = asyncio.run(main())
        assert all(len(o) == 16 for o in outs)
        for _ in range(100):
            if eng.stats().running == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert eng.stats().running == 0 and eng.stats().waiting == 0
    finally:
        eng.shutdown(timeout=1)
