"""Per-sequence sampling with llama.cpp's native samplers, plus grammar, logit bias and log-probabilities.

Contract: SeqSampler.sample(batch_index) picks one token from the logits of that batch position, using
the request's parameters. logit_bias is added to the logits first, and with suppress_stops the end-of-
generation and stop ids are set to -inf (min_tokens); both edit llama.cpp's logits in place, so the
log-probabilities reported afterwards are of the biased distribution. The grammar (if any) constrains only
once activate_grammar() was called, so a thinking model reasons freely and only its answer must match.
As llama.cpp's common sampler does, the token is picked without the grammar first and only that one token
is checked; only when the grammar rejects it is the token picked again from what the grammar allows
(grammar_resamples counts those). When the pick only depends on the best allowed tokens (greedy, or top_k
first in the chain), the grammar checks the best candidates in growing slices until it has enough; else
it runs over the whole vocabulary (grammar_full_passes). Either way the result is the same as the
grammar over the whole vocabulary followed by the chain. free() releases the native samplers.
Plain greedy (temperature 0, no penalties) takes numpy's argmax of the logits view instead of the native
chain, which copies all ~152k candidates per token; both pick the first maximum.
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Iterable

import llama_cpp
import numpy as np

from qwenkit.engines.llamacpp.model import LlamaModel
from qwenkit.engines.request import Grammar, GrammarError, TokenLogprob
from qwenkit.engines.sampling import SamplingParams

PENALTY_LAST_N = 64
# How many of the best candidates the grammar checks, in turn, when a pick was rejected. Fewer than needed
# allowed among the best 2,048 means a narrow state (JSON punctuation): the whole pass is then cheaper.
RESAMPLE_SLICES = (256, 2048)
# llama_token_data as numpy sees it: the candidate array is filled with numpy, not a Python loop.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


def _has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty or params.presence_penalty)


def _chain(model: LlamaModel, params: SamplingParams, seed: int) -> llama_cpp.llama_sampler_p:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
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


def _grammar_sampler(model: LlamaModel, grammar: Grammar) -> llama_cpp.llama_sampler_p:
    g = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.gbnf.encode(), grammar.root.encode())
    if not g:
        raise GrammarError("the grammar does not compile; check the JSON schema or GBNF")
    return g


def check_grammar(model: LlamaModel, grammar: Grammar) -> None:
    """Compile the grammar once and throw it away: a bad one is refused before the request runs."""
    llama_cpp.llama_sampler_free(_grammar_sampler(model, grammar))


class Candidates:
    """A reusable llama_token_data_array over the whole vocabulary. One per engine is enough: the engine
    thread samples one sequence at a time, and a per-sequence copy would cost 1.8 MB each."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self.array = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )
        self.ref = ctypes.byref(self.array)

    def fill(self, logits: np.ndarray) -> None:
        # Samplers sort, shrink and pick in place: restore ids, size and selection each time.
        self.data["id"] = self._ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        self.array.size = self.n_vocab
        self.array.selected = -1
        self.array.sorted = False

    def fill_some(self, ids: np.ndarray, logits: np.ndarray) -> None:
        n = len(ids)
        self.data["id"][:n] = ids
        self.data["logit"][:n] = logits
        self.data["p"][:n] = 0.0
        self.array.size = n
        self.array.selected = -1
        self.array.sorted = False

    def allowed(self) -> np.ndarray:
        """Indices (into the filled entries) whose logit a grammar left finite."""
        return np.flatnonzero(~np.isneginf(self.data["logit"][: self.array.size]))

    def all_rejected(self) -> bool:
        return bool(np.isneginf(self.data["logit"][: self.array.size]).all())

    def selected(self) -> int:
        return int(self.data["id"][self.array.selected])


class SeqSampler:
    def __init__(
        self,
        model: LlamaModel,
        params: SamplingParams,
        grammar: Grammar | None,
        grammar_active: bool,
        stop_ids: Iterable[int] = (),
        candidates: Candidates | None = None,
    ) -> None:
        """stop_ids: what suppress_stops masks (end-of-generation and stop token ids, for min_tokens)."""
        self._model = model
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._grammar = _grammar_sampler(model, grammar) if grammar is not None else None
        self._chain = _chain(model, params, seed)  # after the grammar, which may raise
        self.grammar_active = grammar_active and self._grammar is not None
        self._candidates = candidates
        # Greedy with no penalties is stateless: the native chain adds a full-vocabulary copy per token.
        self.argmax = params.temperature == 0 and not _has_penalties(params)
        # How many of the best allowed tokens decide a resampled pick (0: it takes the whole vocabulary).
        top_k_first = params.temperature > 0 and params.top_k > 0 and not _has_penalties(params)
        self._decided_by = 1 if self.argmax else params.top_k if top_k_first else 0
        bias = params.logit_bias
        self._bias_ids = np.fromiter(bias.keys(), np.int64, len(bias)) if bias else None
        self._bias_values = np.fromiter(bias.values(), np.float32, len(bias)) if bias else None
        self._stop_ids = np.unique(np.fromiter(stop_ids, np.int64))
        self._one = llama_cpp.llama_token_data(0, 1.0, 0.0)  # the one-token check, allocated once
        self._one_array = llama_cpp.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
        self._one_ref = ctypes.byref(self._one_array)
        self.grammar_checks = 0  # tokens picked under the grammar
        self.grammar_resamples = 0  # of those, how many were rejected at first and picked again
        self.grammar_full_passes = 0  # of the resamples, how many ran the grammar over the whole vocabulary

    def activate_grammar(self) -> None:
        self.grammar_active = self._grammar is not None

    def sample(self, batch_index: int, suppress_stops: bool = False) -> int:
        logits = self._model.logits(batch_index)
        if self._bias_ids is not None:
            logits[self._bias_ids] += self._bias_values
        saved = None
        if suppress_stops and self._stop_ids.size:
            saved = logits[self._stop_ids].copy()
            logits[self._stop_ids] = -np.inf
        if not self.grammar_active:
            if self.argmax:
                return int(np.argmax(logits))
            return llama_cpp.llama_sampler_sample(self._chain, self._model.ctx, batch_index)
        return self._sample_with_grammar(logits, saved)

    def _sample_with_grammar(self, logits: np.ndarray, saved: np.ndarray | None) -> int:
        grammar = self._grammar
        cand = self._candidates or self._own_candidates()
        self.grammar_checks += 1
        if self.argmax:
            token = int(np.argmax(logits))
        else:
            cand.fill(logits)
            llama_cpp.llama_sampler_apply(self._chain, cand.ref)
            token = cand.selected()
        if not self._allows(token):
            self.grammar_resamples += 1
            token = self._resample_from_best(cand, logits) if self._decided_by else -1
            if token < 0:
                token = self._resample_from_all(cand, logits, saved)
        llama_cpp.llama_sampler_accept(grammar, token)
        if not self.argmax:
            llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _resample_from_best(self, cand: Candidates, logits: np.ndarray) -> int:
        """The pick among the best allowed tokens, or -1 when too few are allowed among the best."""
        need = self._decided_by
        n = len(logits)
        sizes = [size for size in RESAMPLE_SLICES if need <= size <= n // 8]
        if not sizes:
            return -1
        # One partial sort for every slice: the best `size` candidates end up last, each slice apart.
        order = np.argpartition(logits, [n - size for size in reversed(sizes)])
        found: list[np.ndarray] = []
        done = 0
        for size in sizes:
            part = order[n - size : n - done]
            part = part[np.lexsort((part, -logits[part]))]  # best first; ties: lower id first, as argmax
            cand.fill_some(part, logits[part])
            llama_cpp.llama_sampler_apply(self._grammar, cand.ref)
            found.append(part[cand.allowed()])
            done = size
            if sum(len(f) for f in found) >= need:
                keep = np.concatenate(found)[:need]
                if self.argmax:
                    return int(keep[0])
                cand.fill_some(keep, logits[keep])
                llama_cpp.llama_sampler_apply(self._chain, cand.ref)
                return cand.selected()
        return -1

    def _resample_from_all(self, cand: Candidates, logits: np.ndarray, saved: np.ndarray | None) -> int:
        """llama.cpp's way: the grammar over the whole vocabulary, then the chain."""
        self.grammar_full_passes += 1
        cand.fill(logits)
        llama_cpp.llama_sampler_apply(self._grammar, cand.ref)
        if saved is not None and cand.all_rejected():
            # The grammar only allows what min_tokens suppresses (it is complete): let it end.
            logits[self._stop_ids] = saved
            cand.fill(logits)
            llama_cpp.llama_sampler_apply(self._grammar, cand.ref)
        if cand.all_rejected():  # accepting a token the grammar refuses would abort the whole process
            raise GrammarError("the grammar allows no next token")
        llama_cpp.llama_sampler_apply(self._chain, cand.ref)
        return cand.selected()

    def _allows(self, token: int) -> bool:
        one = self._one
        one.id, one.logit = token, 1.0
        self._one_array.size, self._one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(self._grammar, self._one_ref)
        return one.logit != -np.inf

    def _own_candidates(self) -> Candidates:
        self._candidates = Candidates(self._model.n_vocab)
        return self._candidates

    def accept_forced(self, token: int) -> None:
        """Tell the samplers about a token the engine inserted (penalty history, grammar state)."""
        llama_cpp.llama_sampler_accept(self._chain, token)
        if self.grammar_active and self._grammar is not None:
            llama_cpp.llama_sampler_accept(self._grammar, token)

    def free(self) -> None:
        for sampler in (self._chain, self._grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        self._chain = self._grammar = None  # type: ignore[assignment]


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
