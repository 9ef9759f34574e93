"""Per-sequence sampling with llama.cpp's native samplers, plus grammar and log-probabilities.

Contract: SeqSampler.sample(batch_index) picks one token from the logits of that batch position, using
the request's parameters; the grammar (if any) constrains only once activate_grammar() was called, so a
thinking model reasons freely and only its answer must match. free() releases the native chains.
Plain greedy (temperature 0, no penalties, no active grammar) takes numpy's argmax of the logits view
instead of the native chain, which copies all ~152k candidates per token; both pick the first maximum.
"""

from __future__ import annotations

import random

import llama_cpp
import numpy as np

from qwenkit.engines.llamacpp.model import LlamaModel
from qwenkit.engines.request import Grammar, GrammarError, TokenLogprob
from qwenkit.engines.sampling import SamplingParams

PENALTY_LAST_N = 64


def _has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty or params.presence_penalty)


def _chain(
    model: LlamaModel, params: SamplingParams, seed: int, grammar: Grammar | None
) -> llama_cpp.llama_sampler_p:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
    if grammar is not None:
        g = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.gbnf.encode(), grammar.root.encode())
        if not g:
            llama_cpp.llama_sampler_free(chain)
            raise GrammarError("the grammar does not compile; check the JSON schema or GBNF")
        add(g)
    if _has_penalties(params):
        add(
            llama_cpp.llama_sampler_init_penalties(
                model.n_vocab,
                PENALTY_LAST_N,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    if params.temperature == 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


def check_grammar(model: LlamaModel, grammar: Grammar) -> None:
    """Compile the grammar once and throw it away: a bad one is refused before the request runs."""
    g = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.gbnf.encode(), grammar.root.encode())
    if not g:
        raise GrammarError("the grammar does not compile; check the JSON schema or GBNF")
    llama_cpp.llama_sampler_free(g)


class SeqSampler:
    def __init__(
        self, model: LlamaModel, params: SamplingParams, grammar: Grammar | None, grammar_active: bool
    ) -> None:
        self._model = model
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._free = _chain(model, params, seed, None)
        # With a grammar, two chains share the seed; the constrained one is used once activated.
        self._constrained = _chain(model, params, seed, grammar) if grammar is not None else None
        self.grammar_active = grammar_active and self._constrained is not None
        # Greedy with no penalties is stateless: the native chain adds a full-vocabulary copy per token.
        self.argmax = params.temperature == 0 and not _has_penalties(params)

    def activate_grammar(self) -> None:
        self.grammar_active = self._constrained is not None

    def sample(self, batch_index: int) -> int:
        if self.argmax and not self.grammar_active:
            return int(np.argmax(self._model.logits(batch_index)))
        chain = self._constrained if self.grammar_active and self._constrained is not None else self._free
        return llama_cpp.llama_sampler_sample(chain, self._model.ctx, batch_index)

    def accept_forced(self, token: int) -> None:
        """Tell the chains about a token the engine inserted (penalty history, grammar state)."""
        llama_cpp.llama_sampler_accept(self._free, token)
        if self.grammar_active and self._constrained is not None:
            llama_cpp.llama_sampler_accept(self._constrained, token)

    def free(self) -> None:
        for chain in (self._free, self._constrained):
            if chain is not None:
                llama_cpp.llama_sampler_free(chain)
        self._free = self._constrained = None  # type: ignore[assignment]


def logprobs_for(model: LlamaModel, batch_index: int, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the raw model distribution, and the top alternatives."""
    logits = model.logits(batch_index).astype(np.float64)
    shifted = logits - logits.max()
    logz = np.log(np.exp(shifted).sum())
    chosen = float(shifted[token] - logz)
    alts: tuple[tuple[int, float], ...] = ()
    if top > 0:
        idx = np.argpartition(-shifted, top)[:top]
        idx = idx[np.argsort(-shifted[idx])]
        alts = tuple((int(i), float(shifted[i] - logz)) for i in idx)
    return TokenLogprob(token, chosen, alts)
