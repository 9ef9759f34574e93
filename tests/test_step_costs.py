"""StepCosts: the step-time model that sizes prompt chunks (engines/llamacpp/costs.py)."""

from __future__ import annotations

import pytest

from qwenkit.engines.llamacpp.costs import MIN_CHUNK, QUEUE_POWER, StepCosts

# A hybrid model on 2 cores, as measured (Qwen3.5 0.8B shape): a decode step costs 16 ms + 18 ms per
# decoding sequence (each reads and writes its recurrent state), a prompt token 8 ms.
A, B, P = 0.016, 0.018, 0.008


def step(n_decode: int, n_prefill: int) -> float:
    return (A + B * n_decode if n_decode else 0.0) + P * n_prefill


def test_before_any_measurement_the_initial_chunk() -> None:
    assert StepCosts(2.5, 512, initial_chunk=64).chunk(8) == 64


def test_linear_decode_cost_is_fitted_and_prefill_is_not_starved() -> None:
    costs = StepCosts(2.5, 512)
    # Streams start one after another: decode-only steps with 1..8 sequences, mixed steps in between.
    for n in range(1, 9):
        for _ in range(3):
            costs.observe(n, 0, step(n, 0))
        costs.observe(n, 40, step(n, 40))
    assert costs.decode_cost(8) == pytest.approx(A + 8 * B)
    assert costs.prefill_token == pytest.approx(P)
    # The step beside 7 decodes may cost 1.5 more decode steps: 1.5 * (16 + 7*18) ms / 8 ms per token.
    assert costs.chunk(7) == int(1.5 * (A + 7 * B) / P)
    assert costs.chunk(1) < costs.chunk(7)


def test_mixed_steps_charge_only_the_prompt_tokens() -> None:
    """Learned from 1-sequence steps only, a per-step constant would charge 6 decodes' cost to the prompt
    tokens of a mixed step beside 7 decodes; the per-sequence model does not."""
    costs = StepCosts(2.5, 512)
    costs.observe(1, 0, step(1, 0))
    costs.observe(7, 0, step(7, 0))
    for _ in range(20):
        costs.observe(7, 30, step(7, 30))
    assert costs.prefill_token == pytest.approx(P, rel=0.01)


def test_chunk_bounds() -> None:
    costs = StepCosts(2.5, 64)
    costs.observe(8, 0, 10.0)  # a very slow decode: the chunk is capped at max_prompt
    costs.observe(0, 100, 0.1)
    assert costs.chunk(8) == 64
    fast = StepCosts(2.5, 512)
    fast.observe(1, 0, 0.001)  # a decode far cheaper than a prompt token: the floor
    fast.observe(0, 10, 1.0)
    assert fast.chunk(1) == MIN_CHUNK


def test_noise_that_makes_a_step_cheaper_than_its_decodes_is_ignored() -> None:
    costs = StepCosts(2.5, 512)
    costs.observe(4, 0, step(4, 0))
    costs.observe(4, 10, step(4, 0) * 0.9)
    assert costs.prefill_token is None


def test_a_queue_of_prompts_gets_more_than_one_chunk_per_prompt() -> None:
    costs = StepCosts(2.5, 512)
    costs.observe(1, 0, step(1, 0))
    costs.observe(7, 0, step(7, 0))
    costs.observe(0, 100, step(0, 100))
    chunk = costs.chunk(6)
    assert costs.budget(6, 0) == 0
    assert costs.budget(6, 1) == chunk  # one prompt beside the streams: their ITL is what is protected
    assert costs.budget(6, 2) == chunk * 2**QUEUE_POWER > 2 * chunk
    assert costs.budget(6, 8) == 512  # never past max_prompt


def test_the_scheduler_serves_the_oldest_prompt_first_within_its_budget(demo_gguf) -> None:
    """Three prompts queued beside one stream: the step's budget goes to the oldest prompt first."""
    from qwenkit.engines.llamacpp.config import EngineConfig
    from qwenkit.engines.llamacpp.engine import LlamaCppEngine
    from qwenkit.engines.request import GenerationRequest
    from qwenkit.engines.sampling import SamplingParams

    eng = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=2048, max_seqs=4, threads=2))
    eng.scheduler.prefill_budget = lambda n_decode, n_prefilling: 50 * n_prefilling
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=20)
        eng.submit(GenerationRequest("stream", tuple(range(100, 110)), greedy), lambda e: None)
        eng.step()
        for i, rid in enumerate(("a", "b", "c")):
            eng.submit(GenerationRequest(rid, tuple(range(200 + i, 300 + i)), greedy), lambda e: None)
        eng._drain_inbox()
        eng.scheduler.admit()
        plan = eng.scheduler.plan()
        fed = {s.request_id: n for s, n in plan.entries}
        # 3 x 50 tokens: the oldest takes all 100 it needs, the next the rest, the newest waits.
        assert fed == {"stream": 1, "a": 100, "b": 50}
    finally:
        eng.close()
