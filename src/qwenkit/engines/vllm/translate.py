"""Pure translations between qwenkit's engine types and vLLM's, as plain values (no vLLM import here).

Contract: sampling_kwargs() is the keyword set for vllm.SamplingParams of one GenerationRequest (delta
outputs, max_tokens filled to the request's room, stop ids, logprobs, seed, penalties, min_tokens,
logit_bias, the grammar as structured outputs (a JSON schema as `json`; a GBNF-only grammar, such as a
forced tool call, as xgrammar EBNF in `grammar`, see ebnf.py), the thinking budget); generate_kwargs() is what
AsyncLLM.generate takes beside it (the token-id prompt with the request's images, and reasoning_ended, which
tells vLLM's structured-output manager whether the grammar applies from the first token or only after
</think>). Images go as TokensPrompt multi_modal_data (the decoded RGB pixels, in prompt order) with their
sha256 as multi_modal_uuids (what vLLM's multimodal and prefix caches key on); the prompt keeps one
<|image_pad|> per image, which vLLM's Qwen-VL processors replace with the image's tokens.
engine_args() is the keyword set for vllm.AsyncEngineArgs. EventTracker turns vLLM's delta RequestOutputs
(any object with the same attributes) into TokenEvents. Nothing here blocks or touches a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from qwenkit.engines.request import (
    THINKING_EARLY_STOP,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
)
from qwenkit.engines.vllm.ebnf import xgrammar_ebnf

DELTA = "DELTA"  # vllm.sampling_params.RequestOutputKind member name: each output carries only new tokens
QWEN_REASONING_PARSER = "qwen3"  # vLLM's parser for <think>…</think> (Qwen3, QwQ, Qwen3.5)
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "error": "error",
    "repetition": "stop",  # vLLM's repetition detector ended it: the answer is complete as far as it goes
}


def structured_outputs(request: GenerationRequest) -> dict[str, str] | None:
    """Keyword arguments for vllm.sampling_params.StructuredOutputsParams, or None without a grammar: the
    JSON schema when the grammar came from one (vLLM compiles it itself), else the GBNF as xgrammar EBNF
    (forced tool calls, whose rules name Qwen's <tool_call> tokens)."""
    grammar = request.grammar
    if grammar is None:
        return None
    if grammar.json_schema is not None:
        return {"json": grammar.json_schema}
    return {"grammar": xgrammar_ebnf(grammar)}


def sampling_kwargs(
    request: GenerationRequest, n_ctx: int, prompt_tokens: int | None = None
) -> dict[str, Any]:
    """Keyword arguments for vllm.SamplingParams; output_kind is the RequestOutputKind member's name.
    prompt_tokens: the prompt's length as vLLM sees it (images expanded), default its token ids."""
    s = request.sampling
    room = n_ctx - (len(request.prompt_token_ids) if prompt_tokens is None else prompt_tokens)
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,  # -1 is "off" in both
        "min_p": s.min_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repetition_penalty": s.repetition_penalty,
        "seed": s.seed,
        "stop": list(s.stop),
        "stop_token_ids": sorted(request.stop_token_ids),
        "ignore_eos": request.ignore_eos,
        # vLLM's default is 16 tokens; qwenkit's None means "up to the context".
        "max_tokens": s.max_tokens if s.max_tokens is not None else room,
        "min_tokens": s.min_tokens,
        "logprobs": request.logprobs,
        "logit_bias": dict(s.logit_bias) or None,
        "include_stop_str_in_output": s.include_stop_str_in_output,
        "skip_special_tokens": s.skip_special_tokens,
        "output_kind": DELTA,
    }
    structured = structured_outputs(request)
    if structured is not None:
        kwargs["structured_outputs"] = structured
    thinking = request.thinking
    if thinking is not None and thinking.budget is not None:
        kwargs["thinking_token_budget"] = thinking.budget
    return kwargs


def reasoning_ended(request: GenerationRequest) -> bool | None:
    """Whether the grammar applies from the first generated token (True), only after </think> (False: the
    prompt opened <think>), or as vLLM's Qwen3 reasoning parser finds in the output (None)."""
    grammar = request.grammar
    if grammar is None:
        return None
    thinking = request.thinking
    if not grammar.after_think or thinking is None:
        return True
    return False if thinking.starts_inside else None


def generate_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """AsyncLLM.generate's arguments other than sampling_params: a TokensPrompt and the request id."""
    prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_token_ids)}
    if request.images:
        prompt["multi_modal_data"] = {"image": [image.pixels for image in request.images]}
        prompt["multi_modal_uuids"] = {"image": [image.sha256 for image in request.images]}
    kwargs: dict[str, Any] = {"prompt": prompt, "request_id": request.request_id}
    ended = reasoning_ended(request)
    if ended is not None:
        kwargs["reasoning_ended"] = ended
    return kwargs


@dataclass(frozen=True)
class VllmSettings:
    """How qwenkit starts vLLM: the model directory and the parallel layout the planner chose."""

    model: str
    max_model_len: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    expert_parallel: bool = False
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    quantization: str | None = None  # None: what the checkpoint says (AWQ/GPTQ/fp8 configs are read by vLLM)
    ray_address: str | None = None  # multi-node: vLLM's workers on this Ray cluster
    nodes: int = 1
    max_logprobs: int = 20


def engine_args(settings: VllmSettings) -> dict[str, Any]:
    """Keyword arguments for vllm.AsyncEngineArgs; reasoning_config is returned as its own keywords."""
    multi = settings.nodes > 1 or settings.ray_address is not None
    return {
        "model": settings.model,
        "tokenizer": settings.model,
        "max_model_len": settings.max_model_len,
        "tensor_parallel_size": settings.tensor_parallel,
        "pipeline_parallel_size": settings.pipeline_parallel,
        "data_parallel_size": settings.data_parallel,
        "enable_expert_parallel": settings.expert_parallel,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_num_seqs": settings.max_num_seqs,
        "quantization": settings.quantization,
        "max_logprobs": settings.max_logprobs,
        "distributed_executor_backend": "ray" if multi else None,
        "enable_prefix_caching": True,
        # Structured outputs wait for </think>, and the thinking budget forces Qwen's own early-stop text.
        "reasoning_parser": QWEN_REASONING_PARSER,
        "reasoning_config": {
            "reasoning_parser": QWEN_REASONING_PARSER,
            "reasoning_start_str": "<think>",
            "reasoning_end_str": THINKING_EARLY_STOP,
        },
    }


class _Logprob(Protocol):
    logprob: float
    rank: int | None


def token_logprobs(
    token_ids: list[int], logprobs: list[dict[int, _Logprob]] | None, k: int | None
) -> list[TokenLogprob] | None:
    """vLLM's per-token {id: Logprob} (the sampled token plus the top k by rank) as TokenLogprobs."""
    if k is None or logprobs is None:
        return None
    out = []
    for token, entries in zip(token_ids, logprobs, strict=False):
        chosen = entries.get(token)
        ranked = sorted(
            ((tid, lp) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= k),
            key=lambda item: item[1].rank or 0,
        )
        top = tuple((tid, float(lp.logprob)) for tid, lp in ranked[:k])
        out.append(TokenLogprob(token, float(chosen.logprob) if chosen else float("-inf"), top))
    return out


@dataclass
class EventTracker:
    """One request's running totals while its delta outputs arrive; event() makes each TokenEvent."""

    request: GenerationRequest
    think_start: int | None = None
    think_end: int | None = None
    prompt_tokens: int | None = None  # the prompt as vLLM sees it (images expanded); None: its token ids
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    _in_reasoning: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        thinking = self.request.thinking
        self._in_reasoning = bool(thinking and thinking.starts_inside)

    def _track(self, token_ids: list[int]) -> None:
        thinking = self.request.thinking
        if thinking is None:
            return
        for token in token_ids:
            if token == self.think_start and self.completion_tokens == 0:
                self._in_reasoning = True
            elif token == self.think_end:
                self._in_reasoning = False
            elif self._in_reasoning:
                self.reasoning_tokens += 1
            self.completion_tokens += 1
        if thinking.budget is not None:  # vLLM's forced early-stop text is not reasoning the model chose
            self.reasoning_tokens = min(self.reasoning_tokens, thinking.budget)

    def event(self, output: Any) -> TokenEvent:
        """The TokenEvent for one RequestOutput (DELTA kind: only this step's tokens and text)."""
        completion = output.outputs[0] if output.outputs else None
        token_ids = list(completion.token_ids) if completion else []
        if self.request.thinking is None:
            self.completion_tokens += len(token_ids)
        else:
            self._track(token_ids)
        finish: FinishReason | None = None
        error = None
        if output.finished:
            raw = str(completion.finish_reason) if completion and completion.finish_reason else "stop"
            finish = _FINISH.get(raw, "stop")
            if finish == "error":
                error = "vLLM ended the request with an internal error; retry it"
        return TokenEvent(
            request_id=self.request.request_id,
            token_ids=token_ids,
            text=completion.text if completion else "",
            finish_reason=finish,
            prompt_tokens=len(self.request.prompt_token_ids)
            if self.prompt_tokens is None
            else self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=int(getattr(output, "num_cached_tokens", 0) or 0),
            reasoning_tokens=self.reasoning_tokens,
            logprobs=token_logprobs(
                token_ids, completion.logprobs if completion else None, self.request.logprobs
            ),
            error=error,
        )


__all__ = [
    "EventTracker",
    "VllmSettings",
    "engine_args",
    "generate_kwargs",
    "reasoning_ended",
    "sampling_kwargs",
    "structured_outputs",
    "token_logprobs",
]
