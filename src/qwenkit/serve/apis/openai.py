"""The OpenAI wire format's answers: native chat and completion events → chat.completion(.chunk) and
text_completion objects, framed as server-sent events ending in `data: [DONE]`.

Contract: a job turns each engine event into the chunks a stream sends and adds them up, so the
non-stream response is exactly the stream's chunks added up. Chat: parser deltas → content, both reasoning
fields (reasoning_content and reasoning) and tool-call deltas (id and name first, then argument pieces);
max_calls drops later calls whole (parallel_tool_calls false); echo opens each choice's content. Completions:
text as generated (stop strings already cut), logprobs with text offsets, echo of the prompt. Only
translation lives here: planning, limits and running stay in serve/handlers.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from qwenkit.chat.parse import OutputParser, ParseAccumulator, ParseDelta
from qwenkit.engines.request import TokenEvent
from qwenkit.serve.errors import APIError
from qwenkit.serve.events import finish_reason, merged_fragments
from qwenkit.serve.logprobs import chat_logprobs, completion_logprobs
from qwenkit.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    Usage,
)

if TYPE_CHECKING:
    from qwenkit.serve.handlers import ServeContext

_R = TypeVar("_R", ChatCompletion, ChatCompletionChunk, Completion)


def sse(model: BaseModel, include_usage: bool) -> str:
    """One server-sent event; a chunk's usage field only when the client asked for usage."""
    exclude = None if include_usage or not isinstance(model, ChatCompletionChunk | Completion) else {"usage"}
    return f"data: {model.model_dump_json(exclude=exclude)}\n\n"


class _Envelope:
    """The id, creation time and model name every response object and chunk of one request shares."""

    media_type = "text/event-stream"
    model: str | None = None  # the name asked for when it is not the served one ("model:adapter")

    def __init__(self, ctx: ServeContext, response_id: str) -> None:
        self.ctx = ctx
        self.id = response_id
        self.created = int(time.time())

    def wrap(self, kind: type[_R], choices: list[Any], usage: Usage | None = None) -> _R:
        model = self.model or self.ctx.model_name
        return kind(id=self.id, created=self.created, model=model, choices=choices, usage=usage)

    def frame(self, item: BaseModel, include_usage: bool) -> str:
        return sse(item, include_usage)

    def done(self) -> str:
        return "data: [DONE]\n\n"

    def error_frame(self, err: APIError) -> str:
        return f"data: {json.dumps(err.body())}\n\n"


@dataclass
class _ChatChoiceState:
    parser: OutputParser
    parsed: ParseAccumulator = field(default_factory=ParseAccumulator)  # the deltas added up
    logprobs: list[TokenLogprob] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    finish: str | None = None


class ChatJob(_Envelope):
    """Chat events → parser deltas → chunks; the non-stream response is the chunks added up."""

    def __init__(
        self,
        ctx: ServeContext,
        response_id: str,
        n: int,
        *,
        parser: Callable[[], OutputParser],
        logprobs: bool,
        top: int,
        include_usage: bool,
        echo: str | None = None,
        max_calls: int | None = None,
    ) -> None:
        """echo: text that opens every choice's content; max_calls: tool calls past it are dropped."""
        super().__init__(ctx, response_id)
        self.choices = [_ChatChoiceState(parser()) for _ in range(n)]
        self.want_logprobs = logprobs
        self.top = top
        self.include_usage = include_usage
        self.echo = echo
        self.max_calls = max_calls

    def _chunk(self, choice: ChunkChoice) -> ChatCompletionChunk:
        return self.wrap(ChatCompletionChunk, [choice])

    def start(self) -> list[BaseModel]:
        if self.echo:
            for state in self.choices:
                state.parsed.add(ParseDelta(content=self.echo))
        return [
            self._chunk(ChunkChoice(index=i, delta=Delta(role="assistant", content=self.echo or "")))
            for i in range(len(self.choices))
        ]

    def on_event(self, index: int, event: TokenEvent) -> list[BaseModel]:
        state = self.choices[index]
        state.raw.append(event.text)
        delta = state.parser.feed(event.text)
        if event.finished:
            delta = delta.then(state.parser.finish())
        if self.max_calls is not None and any(c.index >= self.max_calls for c in delta.tool_calls):
            # parallel_tool_calls false: later calls are dropped whole (they were calls, not content).
            delta = replace(delta, tool_calls=[c for c in delta.tool_calls if c.index < self.max_calls])
        state.parsed.add(delta)
        content = delta.content
        calls: list[DeltaToolCall] = []
        for index_, id_, name, arguments in merged_fragments(delta.tool_calls):
            if id_ is not None:  # a call's first fragment carries its id and name
                function = DeltaFunction(name=name, arguments=arguments)
                calls.append(DeltaToolCall(index=index_, id=id_, type="function", function=function))
            else:
                calls.append(DeltaToolCall(index=index_, function=DeltaFunction(arguments=arguments)))
        logprobs = None
        if self.want_logprobs and event.logprobs:
            logprobs = chat_logprobs(self.ctx.texts, event.logprobs, self.top)
            state.logprobs += logprobs
        chunks: list[BaseModel] = []
        out_delta = Delta(
            reasoning_content=delta.reasoning or None,
            reasoning=delta.reasoning or None,
            content=content or None,
            tool_calls=calls or None,
        )
        if delta.reasoning or content or calls or logprobs:
            lp = ChoiceLogprobs(content=logprobs) if logprobs else None
            chunks.append(self._chunk(ChunkChoice(index=index, delta=out_delta, logprobs=lp)))
        if event.finished:
            state.finish = finish_reason(event, self.ctx.draining, bool(state.parsed.result().tool_calls))
            chunks.append(self._chunk(ChunkChoice(index=index, delta=Delta(), finish_reason=state.finish)))
        return chunks

    def response(self, usage: Usage) -> BaseModel:
        choices = []
        for i, state in enumerate(self.choices):
            out = state.parsed.result()
            calls = [
                ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in out.tool_calls
            ]
            message = AssistantMessage(
                content=out.content,
                reasoning_content=out.reasoning,
                reasoning=out.reasoning,
                tool_calls=calls or None,
            )
            lp = ChoiceLogprobs(content=state.logprobs) if self.want_logprobs else None
            choices.append(ChatChoice(index=i, message=message, logprobs=lp, finish_reason=state.finish))
        return self.wrap(ChatCompletion, choices, usage)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self.wrap(ChatCompletionChunk, [], usage)

    def completion_text(self, index: int) -> str:
        return "".join(self.choices[index].raw)


@dataclass
class _TextChoiceState:
    text: list[str] = field(default_factory=list)
    logprobs: list[CompletionLogprobs] = field(default_factory=list)
    chars: int = 0
    finish: str | None = None


class CompletionJob(_Envelope):
    """Text completion events → chunks and the response (text as generated, stop strings already cut)."""

    def __init__(
        self,
        ctx: ServeContext,
        response_id: str,
        n: int,
        logprobs: int | None,
        echo: list[str] | None,
        include_usage: bool,
    ) -> None:
        super().__init__(ctx, response_id)
        self.choices = [_TextChoiceState() for _ in range(n)]
        self.logprobs = logprobs
        self.echo = echo
        self.include_usage = include_usage

    def _chunk(self, choice: CompletionChoice) -> Completion:
        return self.wrap(Completion, [choice])

    def start(self) -> list[BaseModel]:
        if not self.echo:
            return []
        chunks: list[BaseModel] = []
        for i, prompt in enumerate(self.echo):
            self.choices[i].text.append(prompt)
            self.choices[i].chars += len(prompt)
            chunks.append(self._chunk(CompletionChoice(index=i, text=prompt)))
        return chunks

    def on_event(self, index: int, event: TokenEvent) -> list[BaseModel]:
        state = self.choices[index]
        logprobs = None
        if self.logprobs is not None and event.logprobs:
            logprobs = completion_logprobs(self.ctx.texts, event.logprobs, self.logprobs, state.chars)
            state.logprobs.append(logprobs)
        state.text.append(event.text)
        state.chars += len(event.text)
        finish = None
        if event.finished:
            finish = state.finish = finish_reason(event, self.ctx.draining, made_calls=False)
        if not (event.text or logprobs or finish):
            return []
        return [
            self._chunk(
                CompletionChoice(index=index, text=event.text, logprobs=logprobs, finish_reason=finish)
            )
        ]

    def response(self, usage: Usage) -> BaseModel:
        choices = []
        for i, state in enumerate(self.choices):
            lp = None
            if self.logprobs is not None:
                lp = CompletionLogprobs(
                    tokens=[t for p in state.logprobs for t in p.tokens],
                    token_logprobs=[v for p in state.logprobs for v in p.token_logprobs],
                    top_logprobs=[d for p in state.logprobs for d in p.top_logprobs or []],
                    text_offset=[o for p in state.logprobs for o in p.text_offset],
                )
            choices.append(
                CompletionChoice(index=i, text="".join(state.text), logprobs=lp, finish_reason=state.finish)
            )
        return self.wrap(Completion, choices, usage)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self.wrap(Completion, [], usage)

    def completion_text(self, index: int) -> str:
        return "".join(self.choices[index].text)
