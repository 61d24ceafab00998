"""One chat request's generation, tools included: engine outputs -> per-choice events.

A plain request is one engine request whose text is content. With tools, each choice's text goes
through its format's streaming parser (layerserve.text.tool_parsers), which splits it into
content and tool-call deltas and never lets call markup through. Formats that only route in the
first request (`ChatPlan.routes_only`, the generic format) may decide to answer in text: those
choices then get their text from one follow-up request (`ChatPlan.answer`, n = the number of
such choices), whose prompt is mostly a prefix-cache hit.

Both the JSON response and the SSE stream are built from the same `ChoiceEvent`s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from layerserve.api.chat_prompt import constrained, prompt_ids
from layerserve.api.observe import RequestMetrics
from layerserve.api.runs import Run, Usage, finish_reason
from layerserve.api.state import Runtime
from layerserve.engine.request import CompletionDelta, SamplingParams, TokenLogprob
from layerserve.text.tool_parsers import ParsedDelta, ToolCallDelta, ToolCallParser
from layerserve.text.tool_parsers.base import new_call_id
from layerserve.text.tools import ChatPlan


@dataclass(slots=True)
class ChoiceEvent:
    """What one choice produced since its last event."""

    index: int
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_sequence: str | None = None  # with finish_reason "stop": the stop string that ended the choice


class ChatTurn:
    """Owns the engine requests of one chat completion; `close()` aborts whatever still runs.

    The first engine request starts in the constructor, so a request the engine refuses (too
    long for the context) fails before any response header is sent. `first_params` are the first
    request's params, `constrained(plan, params)` (compiled off the event loop: `prepare_turn`).
    `call_ids` makes the ids of the tool calls the model makes (each surface has its own form)."""

    def __init__(self, rt: Runtime, request_id: str, plan: ChatPlan, params: SamplingParams,
                 prompt_ids: list[int], template_kwargs: dict[str, Any] | None,
                 metrics: RequestMetrics | None = None, *, first_params: SamplingParams,
                 call_ids: Callable[[], str] = new_call_id, session=None) -> None:
        """`session`: the SessionTurn (layerserve.sessions.turn) the turn runs in, or None."""
        self._rt = rt
        self._metrics = metrics
        self._request_id = request_id
        self._plan = plan
        self._params = params
        self._template_kwargs = template_kwargs
        self.usage = Usage(in_session=session is not None)
        self._session = session
        self._runs = [self._run(request_id, prompt_ids, first_params)]
        self._parsers: list[ToolCallParser | None] = [plan.new_parser(call_ids) for _ in range(params.n)]

    def _run(self, request_id: str, ids: list[int], params: SamplingParams) -> Run:
        session = self._session
        if session is None:
            return Run(self._rt.engine, request_id, ids, params, self._metrics)
        return Run(self._rt.engine, request_id, ids, params, self._metrics, session_id=session.session_id,
                   on_last=session.ended)

    def close(self) -> None:
        for run in self._runs:
            run.close()
        if self._session is not None:
            self._session.close()

    def log_fields(self) -> dict[str, Any]:
        """For the request's log line: tokens and time to first token (of the first request)."""
        ttft = self._runs[0].ttft
        return {"prompt_tokens": self.usage.prompt_tokens, "completion_tokens": self.usage.completion_tokens,
                "cached_tokens": self.usage.cached_tokens,
                "ttft_ms": f"{ttft * 1000:.1f}" if ttft is not None else "-", "engine_requests": len(self._runs)}

    async def events(self) -> AsyncIterator[list[ChoiceEvent]]:
        """Batches of events, one batch per engine step that produced something."""
        if self._session is None:
            async for batch in self._events():
                yield batch
            return
        reply = []
        async for batch in self._events():
            reply += [e.content for e in batch if e.index == 0]
            yield batch
        self._session.replied("".join(reply))

    async def _events(self) -> AsyncIterator[list[ChoiceEvent]]:
        answering: list[int] = []  # choices whose text comes from the answer request
        async for out in self._runs[0]:
            batch = [e for d in out.deltas for e in self._first_events(d, answering)]
            if out.finished:
                self.usage.add(out)
            if batch:
                yield batch
        if answering:
            async for batch in self._answer(answering):
                yield batch

    def _first_events(self, d: CompletionDelta, answering: list[int]) -> list[ChoiceEvent]:
        parser = self._parsers[d.index]
        if parser is None:
            reason = finish_reason(d.finish_reason) if d.finish_reason is not None else None
            return [ChoiceEvent(d.index, d.text, logprobs=d.logprobs, finish_reason=reason,
                                stop_sequence=_stop_string(d))]
        parsed = parser.feed(d.text)
        events = [_event(d.index, parsed, d.logprobs)]
        if d.finish_reason is None:
            return events
        events.append(_event(d.index, parser.finish(), None))
        if parser.needs_answer and self._plan.answer is not None:
            answering.append(d.index)
        else:
            reason = finish_reason(d.finish_reason)
            calls = bool(parser.tool_calls) and reason == "stop"
            events[-1].finish_reason = "tool_calls" if calls else reason
            events[-1].stop_sequence = None if calls else _stop_string(d)
        return events

    async def _answer(self, choices: list[int]) -> AsyncIterator[list[ChoiceEvent]]:
        plan = self._plan.answer
        assert plan is not None
        # the answer's prompt and grammar in one hop to a prep thread
        ids, params = await self._rt.offload(_prepare_answer, plan, self._rt, self._template_kwargs, self._params,
                                             self._session)
        params = replace(params, n=len(choices))
        run = self._run(f"{self._request_id}-answer", ids, params)
        self._runs.append(run)
        async for out in run:
            batch = [
                ChoiceEvent(choices[d.index], d.text, logprobs=d.logprobs,
                            finish_reason=finish_reason(d.finish_reason) if d.finish_reason is not None else None,
                            stop_sequence=_stop_string(d))
                for d in out.deltas
            ]
            if out.finished:
                self.usage.add(out)
            if batch:
                yield batch


def _prepare_answer(plan: ChatPlan, rt: Runtime, template_kwargs: dict[str, Any] | None,
                    params: SamplingParams, session) -> tuple[list[int], SamplingParams]:
    ids = session.prompt(plan, rt, template_kwargs) if session is not None else prompt_ids(plan, rt, template_kwargs)
    return ids, constrained(plan, params, rt)


def _stop_string(d: CompletionDelta) -> str | None:
    """The stop string that finished a choice (None for EOS or a stop token id)."""
    return d.stop_reason if isinstance(d.stop_reason, str) else None


def _event(index: int, parsed: ParsedDelta, logprobs: list[TokenLogprob] | None) -> ChoiceEvent:
    return ChoiceEvent(index, parsed.content, parsed.tool_calls, logprobs)


@dataclass(slots=True)
class ChatChoice:
    """A finished choice of a non-streamed response, accumulated from its events."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's message.tool_calls
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: ChoiceEvent) -> None:
        self.content += event.content
        if event.logprobs:
            self.logprobs += event.logprobs
        for delta in event.tool_calls:
            if delta.index == len(self.calls):
                self.calls.append({"id": delta.id, "type": "function",
                                   "function": {"name": delta.name, "arguments": ""}})
            self.calls[delta.index]["function"]["arguments"] += delta.arguments
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason

    def message(self) -> dict[str, Any]:
        """OpenAI's assistant message: content is null when only calls were made."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content, "refusal": None}
        if self.calls:
            message["content"] = self.content or None
            message["tool_calls"] = self.calls
        return message


async def collect_chat(turn: ChatTurn, n: int) -> list[ChatChoice]:
    choices = [ChatChoice() for _ in range(n)]
    async for batch in turn.events():
        for event in batch:
            choices[event.index].add(event)
    return choices


def stream_delta(event: ChoiceEvent) -> dict[str, Any]:
    """The `delta` of an SSE chunk: content and/or tool-call pieces, as OpenAI streams them
    (a call's first piece has its id, type and name; later pieces only argument text)."""
    delta: dict[str, Any] = {}
    if event.content or not event.tool_calls:
        delta["content"] = event.content
    if event.tool_calls:
        calls = []
        for piece in event.tool_calls:
            call: dict[str, Any] = {"index": piece.index}
            function: dict[str, Any] = {"arguments": piece.arguments}
            if piece.id is not None:
                call["id"] = piece.id
                call["type"] = "function"
                function = {"name": piece.name, "arguments": piece.arguments}
            call["function"] = function
            calls.append(call)
        delta["tool_calls"] = calls
    return delta
