"""The llama.cpp engine: continuous batching, sampling, stops, aborts, prefix reuse, thinking, grammar,
per-request failures, stats from other threads, vLLM's sampling extras."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import pytest

from qwenkit.engines.grammar import grammar_from_json_schema
from qwenkit.engines.llamacpp import engine as engine_module
from qwenkit.engines.llamacpp import model as model_module
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.llamacpp.kv import SlotManager
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

    def checked(self: SeqSampler, index: int, suppress_stops: bool = False) -> int:
        token = fast_sample(self, index, suppress_stops)
        assert self.argmax  # plain greedy takes the fast path
        pairs.append((token, llama_cpp.llama_sampler_sample(self._chain, self._model.ctx, index)))
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


def test_stop_string_kept_with_include_stop_str_in_output(engine: LlamaCppEngine) -> None:
    _, text, _ = run(engine, req("si1", prompt(3)))
    stop = text[5:8]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], include_stop_str_in_output=True)
    _, kept, last = run(engine, req("si2", prompt(3), params))
    assert last.finish_reason == "stop"
    assert kept == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_end_the_request(engine: LlamaCppEngine) -> None:
    tokens, _, _ = run(engine, req("e1", prompt(4)))
    _, text, last = run(engine, req("e2", prompt(4), stop_token_ids=frozenset({tokens[0]})))
    assert last.finish_reason == "stop" and last.completion_tokens == 1 and text == ""


def _eos(engine: LlamaCppEngine) -> int:
    eos = llama_cpp.llama_vocab_eos(engine.model.vocab)
    assert engine.model.is_eog(eos) and eos in engine.model.eog_ids
    return eos


def greedy(max_tokens: int = 24, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


def test_logit_bias_forces_and_bans_tokens(engine: LlamaCppEngine) -> None:
    plain, _, _ = run(engine, req("lb0", prompt(14)))
    banned, _, _ = run(engine, req("lb1", prompt(14), greedy(logit_bias={plain[0]: -100})))
    assert banned[0] != plain[0] and plain[0] not in banned
    forced, _, last = run(engine, req("lb2", prompt(14), greedy(8, logit_bias={"4321": 100.0})))
    assert forced == [4321] * 8 and last.finish_reason == "length"
    sampled = SamplingParams(temperature=1.0, seed=1, max_tokens=8, logit_bias={4321: 100})
    assert run(engine, req("lb3", prompt(14), sampled))[0] == [4321] * 8  # the native chain sees it too


def test_logit_bias_ids_outside_the_vocabulary_are_refused(engine: LlamaCppEngine) -> None:
    n_vocab = engine.model.n_vocab
    with pytest.raises(EngineError, match=f"logit_bias: token id {n_vocab} is outside"):
        engine.submit(req("lbx", prompt(1), greedy(logit_bias={5: 1, n_vocab: 1})), lambda ev: None)


def test_eos_ends_the_answer_unless_ignore_eos(engine: LlamaCppEngine) -> None:
    eos = _eos(engine)
    tokens, text, last = run(engine, req("eo1", prompt(15), greedy(logit_bias={eos: 100})))
    assert tokens == [eos] and last.finish_reason == "stop" and last.completion_tokens == 1 and text == ""
    tokens, text, last = run(
        engine, req("eo2", prompt(15), greedy(6, logit_bias={eos: 100}), ignore_eos=True)
    )
    assert tokens == [eos] * 6 and last.finish_reason == "length"
    assert text == ""  # skip_special_tokens: the control token's text is left out


def test_skip_special_tokens_false_keeps_control_tokens_text(engine: LlamaCppEngine) -> None:
    eos = _eos(engine)
    eos_text = engine.model.piece(eos).decode()
    assert eos_text.startswith("<|") and engine.model.piece(eos, special=False) == b""
    params = greedy(3, logit_bias={eos: 100}, skip_special_tokens=False)
    _, text, _ = run(engine, req("sk1", prompt(15), params, ignore_eos=True))
    assert text == eos_text * 3
    # Added tokens that are not control tokens (<think>) keep their text when specials are skipped.
    think = engine.model.token_id("<think>")
    assert think is not None
    _, text, _ = run(engine, req("sk2", prompt(15), greedy(2, logit_bias={think: 100})))
    assert text == "<think><think>"


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_reached(engine: LlamaCppEngine) -> None:
    eos = _eos(engine)
    tokens, _, last = run(engine, req("mt1", prompt(16), greedy(logit_bias={eos: 100}, min_tokens=5)))
    assert eos not in tokens[:5] and tokens[5:] == [eos]
    assert last.finish_reason == "stop" and last.completion_tokens == 6
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=24, min_tokens=3, logit_bias={777: 100})
    tokens, _, last = run(engine, req("mt2", prompt(16), params, stop_token_ids=frozenset({777})))
    assert 777 not in tokens[:3] and tokens[3:] == [777] and last.finish_reason == "stop"


def test_min_tokens_gives_way_to_a_grammar_that_is_complete(engine: LlamaCppEngine) -> None:
    # Once the grammar allows only end-of-generation, min_tokens cannot hold it back (nothing else fits).
    from qwenkit.engines.request import Grammar

    params = SamplingParams(temperature=1.0, seed=2, max_tokens=24, min_tokens=10)
    tokens, text, last = run(
        engine, req("mg", prompt(16), params, grammar=Grammar('root ::= "ok"', after_think=False))
    )
    assert text == "ok" and last.finish_reason == "stop" and engine.model.is_eog(tokens[-1])


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
        demo_gguf("qwen3", "tiny", "f32"),
        # No state cache: the forgotten idle prefix must not come back from there.
        EngineConfig(n_ctx=1024, max_seqs=2, threads=2, kv_unified=unified, state_cache_mb=0),
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


def test_a_burst_at_an_idle_engine_goes_in_one_call_and_prompts_beside_decodes_take_one_ubatch(
    demo_gguf: Callable[..., Path],
) -> None:
    eng = LlamaCppEngine(
        demo_gguf("qwen3", "tiny", "f32"),
        EngineConfig(n_ctx=4096, max_seqs=9, threads=2, n_ubatch=64, prefix_cache=False),
    )
    try:
        assert eng.model.n_batch == 2048 and eng.model.n_ubatch == 64
        calls: list[int] = []
        decode = eng.model.decode

        def counting(tokens: list[int], *args: object) -> int:
            calls.append(len(tokens))
            return decode(tokens, *args)  # type: ignore[arg-type]

        eng.model.decode = counting  # type: ignore[method-assign]
        firsts: dict[int, int] = {}
        for i in range(8):  # 8 x 100 prompt tokens: more than a ubatch, less than n_batch
            sink = lambda ev, i=i: firsts.setdefault(i, len(calls)) if ev.token_ids else None  # noqa: E731
            params = SamplingParams(temperature=0.0, max_tokens=40)
            eng.submit(req(f"burst{i}", prompt(40 + i, 100), params), sink)
        eng.step()
        assert calls == [800] and sorted(firsts) == list(range(8))  # every stream started in that one call
        eng.submit(req("late", prompt(60, 300)), lambda ev: None)
        while eng.step():
            pass
        beside = [n - 8 for n in calls[1:] if n > 8]  # steps where the late prompt went beside 8 decodes
        assert beside and max(beside) <= 64 and sum(beside) >= 299
    finally:
        eng.close()


def test_n_batch_follows_what_llama_cpp_keeps_for_a_small_context(demo_gguf: Callable[..., Path]) -> None:
    eng = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=256, max_seqs=2, threads=2))
    try:
        assert eng.model.n_batch == 256 and eng.scheduler.n_batch == 256  # clamped to n_ctx
        events: list[TokenEvent] = []
        eng.submit(req("a", prompt(3, 120)), events.append)
        eng.submit(req("b", prompt(4, 120)), events.append)
        while eng.step():
            pass
        assert [ev.finish_reason for ev in events if ev.finished] == ["length", "length"]
    finally:
        eng.close()


def test_an_amx_build_loads_without_extra_buffer_types_and_decodes_the_same(
    demo_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # ggml's AMX kernels crash at the first decode; such a build keeps every weight in plain CPU buffers.
    amx, plain = "CPU : AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |", "CPU : AVX512 = 1 | REPACK = 1 |"
    assert "use_extra_bufts" in dict(llama_cpp.llama_model_params._fields_)  # a field, not a new attribute
    assert model_module.model_params(plain).use_extra_bufts
    model_module._warn_amx.cache_clear()
    assert not model_module.model_params(amx).use_extra_bufts
    assert "-mno-amx-int8" in caplog.text
    path, config = demo_gguf("qwen3", "tiny", "q8_0"), EngineConfig(n_ctx=512, max_seqs=1, threads=2)
    answers = []
    for has_amx in (False, True):
        monkeypatch.setattr(model_module, "has_amx", lambda info=None, has_amx=has_amx: has_amx)
        eng = LlamaCppEngine(path, config)
        try:
            answers.append(run(eng, req("a", prompt(5, 40)))[0])
        finally:
            eng.close()
    assert answers[0] == answers[1] and len(answers[0]) == GREEDY.max_tokens


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


# ---- grammar: sample first, check the one token, resample only when the grammar rejects it ----------

# minLength: left free, the random-weight model's first resampled token is "{}".
TEXT_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 40}},
    "required": ["text"],
}
SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer"},
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 12},
    },
    "required": ["n", "ok", "colour", "name"],
}


def _counted_samplers(monkeypatch: pytest.MonkeyPatch) -> list[SeqSampler]:
    """Every sampler the engine makes, kept for its counters."""
    made: list[SeqSampler] = []
    original = SeqSampler.__init__

    def init(self: SeqSampler, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(SeqSampler, "__init__", init)
    return made


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=200),
        SamplingParams(temperature=1.0, seed=1, max_tokens=200),
        SamplingParams(temperature=1.0, seed=2, max_tokens=200),
        SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=3, max_tokens=200),
        SamplingParams(temperature=1.2, seed=4, max_tokens=200, repetition_penalty=1.3),
    ],
)
def test_output_under_a_json_schema_always_matches_it(
    engine: LlamaCppEngine, params: SamplingParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _counted_samplers(monkeypatch)
    grammar = grammar_from_json_schema(SMALL_SCHEMA, after_think=False)
    tokens, text, last = run(engine, req("gj", prompt(9), params, grammar=grammar))
    assert last.finish_reason == "stop"
    value = json.loads(text)
    assert set(value) == {"n", "ok", "colour", "name"}
    assert type(value["n"]) is int and isinstance(value["ok"], bool)
    assert value["colour"] in {"red", "green", "blue"} and len(value["name"]) <= 12
    assert made[0].grammar_resamples > 0  # the random model's own picks were refused and picked again
    if params.seed is not None:  # seeded runs repeat exactly, resampling included
        assert run(engine, req("gj2", prompt(9), params, grammar=grammar))[0] == tokens


def test_grammar_checks_only_the_picked_token_when_it_fits(
    engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inside a free-text string nearly every token fits: the whole-vocabulary pass must stay rare.
    made = _counted_samplers(monkeypatch)
    grammar = grammar_from_json_schema(TEXT_SCHEMA, after_think=False)
    for i, params in enumerate([SamplingParams(temperature=1.0, seed=11, max_tokens=80), greedy(80)]):
        tokens, text, _ = run(engine, req(f"gf{i}", prompt(17), params, grammar=grammar))
        sampler = made[-1]
        assert sampler.grammar_checks == len(tokens) == 80
        assert 0 < sampler.grammar_resamples <= len(tokens) // 4
        # Greedy needs only the best allowed token, mostly found among the best candidates; without
        # top_k the whole distribution counts, so every resample is a whole-vocabulary pass.
        if i == 0:
            assert sampler.grammar_full_passes == sampler.grammar_resamples
        else:
            assert sampler.grammar_full_passes < sampler.grammar_resamples
        assert re.match(r'\{ ?"text" ?: ?"', text) and len(json.loads(text + '"}')["text"]) >= 40


# ---- one request's failure is that request's alone --------------------------------------------------


def _exploding_sampler(when: Callable[[SeqSampler], bool], at_init: bool) -> type[SeqSampler]:
    class Exploding(SeqSampler):
        def __init__(self, model, params, *args, **kwargs):  # type: ignore[no-untyped-def]
            if at_init and params.seed == 666:
                raise RuntimeError("boom in the sampler\nsecond line")
            super().__init__(model, params, *args, **kwargs)
            self.boom = params.seed == 666
            self.picks = 0

        def sample(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.picks += 1
            if self.boom and when(self):
                raise RuntimeError("boom while sampling")
            return super().sample(*args, **kwargs)

    return Exploding


def test_a_request_failing_to_start_fails_alone_and_the_inbox_and_aborts_go_on(
    engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    solo = {rid: run(engine, req(f"solo-{rid}", prompt(60 + i)))[0] for i, rid in enumerate("ab")}
    monkeypatch.setattr(engine_module, "SeqSampler", _exploding_sampler(lambda s: False, at_init=True))
    events: dict[str, list[TokenEvent]] = {rid: [] for rid in ("long", "a", "bad", "b")}
    engine.submit(req("long", prompt(63), greedy(300)), events["long"].append)
    engine.step()
    # One drain: a good request, the failing one, another good one, and an abort queued behind them.
    engine.submit(req("a", prompt(60)), events["a"].append)
    engine.submit(req("bad", prompt(62), SamplingParams(temperature=0.0, seed=666)), events["bad"].append)
    engine.submit(req("b", prompt(61)), events["b"].append)
    engine.abort("long")
    while engine.step():
        pass
    bad = events["bad"]
    assert len(bad) == 1 and bad[0].finish_reason == "error"
    assert bad[0].error == "engine error: boom in the sampler"
    assert events["long"][-1].finish_reason == "abort"
    for rid in "ab":
        assert events[rid][-1].finish_reason == "length"
        assert [t for ev in events[rid] for t in ev.token_ids] == solo[rid]
    assert engine.stats().running == engine.stats().waiting == 0
    assert run(engine, req("bad", prompt(62)))[2].finish_reason == "length"  # its id is free again


def test_a_request_failing_mid_stream_fails_alone_on_the_engine_thread(
    demo_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "SeqSampler", _exploding_sampler(lambda s: s.picks > 3, at_init=False))
    eng = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=2048, max_seqs=4, threads=2))
    eng.start()

    async def collect(rid: str, params: SamplingParams) -> list[TokenEvent]:
        return [ev async for ev in eng.generate(req(rid, prompt(70 + len(rid)), params))]

    async def main() -> list[list[TokenEvent]]:
        jobs = [collect(f"ok{i}", greedy(16)) for i in range(3)]
        jobs.append(collect("bad", SamplingParams(temperature=0.0, seed=666, max_tokens=16)))
        # A hang here is the bug; the timeout only turns it into a failure.
        return await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)

    try:
        *good, bad = asyncio.run(main())
        assert bad[-1].finish_reason == "error" and bad[-1].error == "engine error: boom while sampling"
        assert sum(len(ev.token_ids) for ev in bad) == 3
        for events in good:
            assert events[-1].finish_reason == "length" and sum(len(ev.token_ids) for ev in events) == 16
    finally:
        eng.shutdown(timeout=1)


# ---- stats() from other threads -----------------------------------------------------------------


def test_stats_from_another_thread_never_reads_the_engine_threads_state(
    demo_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=2048, max_seqs=4, threads=2))
    # Who reads the idle-cache dict the engine thread mutates (kv.py `_idle`)?
    readers: set[int] = set()
    idle_cells = SlotManager.idle_cells.fget

    def recorded(self: SlotManager) -> int:
        readers.add(threading.get_ident())
        return idle_cells(self)  # type: ignore[misc]

    monkeypatch.setattr(SlotManager, "idle_cells", property(recorded))
    eng.start()
    stop = threading.Event()
    seen: list[object] = []
    errors: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                seen.append(eng.stats())
            except BaseException as exc:  # any failure here is the bug
                errors.append(exc)
                return

    thread = threading.Thread(target=hammer)
    thread.start()

    async def one(i: int) -> None:
        # Shared prefixes: finished requests leave idle caches that later ones take and drop.
        p = (*prompt(80, 20), *prompt(81 + i % 3, 4))
        async for _ in eng.generate(req(f"h{i}", p, greedy(6))):
            pass

    async def main() -> None:
        for start in range(0, 24, 6):
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(start, start + 6))), timeout=120)

    try:
        asyncio.run(main())
    finally:
        stop.set()
        thread.join()
        engine_thread = eng._thread.ident if eng._thread else None
        final = eng.stats()
        eng.shutdown(timeout=1)
    assert not errors
    assert len(seen) > 10
    assert readers == {engine_thread}
    assert all(0 <= s.running <= 4 and 0 <= s.kv_used <= s.kv_total for s in seen)  # type: ignore[attr-defined]
    assert final.running == 0 and final.waiting == 0 and final.steps > 0


def test_stats_while_decoding_count_steps_live_and_follow_the_kv(demo_gguf: Callable[..., Path]) -> None:
    """A snapshot is taken when requests come and go, else every STATS_EVERY_S: steps are always current,
    the KV use lags by at most that long, and a finished request is gone from the next stats() at once."""
    eng = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=2048, max_seqs=4, threads=2))
    eng.start()
    seen: list[tuple[int, int]] = []

    async def main() -> TokenEvent:
        last = None
        async for ev in eng.generate(req("s", prompt(5, 8), greedy(400))):
            stats = eng.stats()
            seen.append((stats.steps, stats.kv_used))
            last = ev
        assert last is not None
        return last

    try:
        final = asyncio.run(asyncio.wait_for(main(), timeout=120))
        after = eng.stats()
    finally:
        eng.shutdown(timeout=1)
    assert final.finish_reason == "length"
    steps = [s for s, _ in seen]
    assert steps == sorted(steps) and steps[-1] - steps[0] >= 390  # one step per token, read live
    kv = [k for _, k in seen]
    assert kv == sorted(kv) and len(set(kv)) > 2  # refreshed while decoding, not only at the start and end
    assert after.running == 0 and after.waiting == 0


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=60),
        SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=5, max_tokens=60),
        SamplingParams(temperature=1.5, top_k=200, seed=6, max_tokens=60),
    ],
)
def test_resampling_from_the_best_candidates_equals_the_whole_vocabulary_pass(
    engine: LlamaCppEngine, params: SamplingParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _counted_samplers(monkeypatch)
    grammar = grammar_from_json_schema(TEXT_SCHEMA, after_think=False)
    fast, _, _ = run(engine, req("rb1", prompt(19), params, grammar=grammar))
    assert made[-1].grammar_full_passes < made[-1].grammar_resamples
    monkeypatch.setattr(SeqSampler, "_resample_from_best", lambda self, cand, logits: -1)
    whole, _, _ = run(engine, req("rb2", prompt(19), params, grammar=grammar))
    assert made[-1].grammar_full_passes == made[-1].grammar_resamples > 0
    assert fast == whole
