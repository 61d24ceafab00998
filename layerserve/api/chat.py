"""POST /v1/chat/completions: request -> engine request; response or SSE chunks; usage.

Streaming follows OpenAI exactly: a `role` chunk per choice first, then content deltas as the
engine produces them, one chunk per choice with its finish_reason (and an empty delta), with
`stream_options.include_usage` a last chunk with `choices: []` and the usage, then `[DONE]`.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from layerserve.api.chat_prompt import prepare_chat
from layerserve.api.chat_turn import ChatChoice, ChatTurn, collect_chat, stream_delta
from layerserve.api.connection import (
    DONE,
    STATUS_CLIENT_CLOSED,
    ClientDisconnected,
    EventStreamResponse,
    error_event,
    sse_event,
    until_disconnect,
)
from layerserve.api.errors import InvalidRequestError
from layerserve.api.logprobs import TokenText, chat_logprobs
from layerserve.api.protocol import ChatCompletionRequest, parse_request
from layerserve.api.runs import Usage
from layerserve.api.sampling import sampling_params
from layerserve.api.state import Runtime, server_state
from layerserve.api.turn_http import open_session_turn, open_turn

def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class ChatContext:
    """What every chunk and the response of one request share."""

    id: str
    created: int
    model: str
    fingerprint: str
    n: int
    with_logprobs: bool
    include_usage: bool
    obfuscate: bool
    service_tier: str | None
    token_text: TokenText
    _prefix: str = field(default="", init=False)
    _suffix: str = field(default="", init=False)

    def head(self, obj: str) -> dict[str, Any]:
        head: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "system_fingerprint": self.fingerprint}
        if self.service_tier is not None:
            head["service_tier"] = "default"
        return head

    def __post_init__(self) -> None:
        self._prefix = "data: " + _json(self.head("chat.completion.chunk"))[:-1] + ',"choices":['
        self._suffix = "]" + (',"usage":null' if self.include_usage else "")

    def chunk(self, choice: dict[str, Any]) -> str:
        """One SSE event for one choice (built by string assembly: this runs per token)."""
        tail = f',"obfuscation":"{secrets.token_urlsafe(secrets.randbelow(12) + 1)}"' if self.obfuscate else ""
        return f"{self._prefix}{_json(choice)}{self._suffix}{tail}}}\n\n"

    def logprobs(self, items) -> dict[str, Any] | None:
        if not self.with_logprobs:
            return None
        return {"content": chat_logprobs(items or [], self.token_text), "refusal": None}


def completion_budget(req: ChatCompletionRequest) -> int | None:
    """max_completion_tokens (or the deprecated max_tokens); None: up to the context length."""
    a, b = req.max_tokens, req.max_completion_tokens
    if a is not None and b is not None and a != b:
        raise InvalidRequestError("Set 'max_completion_tokens' or 'max_tokens', not both with different values.",
                                  "max_tokens")
    return b if b is not None else a


def logprobs_setting(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


async def create_chat_completion(request: Request) -> Response:
    state = server_state(request)
    rt: Runtime = state.ready()
    req = parse_request(ChatCompletionRequest, await request.body())
    params = sampling_params(req, max_tokens=completion_budget(req), logprobs=logprobs_setting(req),
                             max_n=state.max_n, vocab_size=rt.tokenizer.vocab_size)
    session = await open_session_turn(request, state.sessions)  # the x-layerscale-session-id header
    try:
        return await _chat(request, state, rt, req, params, session)
    except BaseException:
        if session is not None:
            session.close()
        raise


async def _chat(request: Request, state, rt: Runtime, req: ChatCompletionRequest, params, session) -> Response:
    plan, prompt_ids, first_params = await rt.offload(prepare_chat, req, params, rt, state.config,  # off the loop
                                                      session)
    options = req.stream_options
    ctx = ChatContext(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=state.config.served_model_name,
        fingerprint=rt.fingerprint, n=params.n, with_logprobs=params.logprobs is not None,
        include_usage=bool(options and options.include_usage), obfuscate=bool(options and options.include_obfuscation),
        service_tier=req.service_tier, token_text=rt.token_text,
    )
    opened = open_turn(request, state, rt, ctx.id, prompt_ids, params.n,  # 429 when the queue is full
                       lambda: ChatTurn(rt, ctx.id, plan, params, prompt_ids, req.chat_template_kwargs, state.metrics,
                                        first_params=first_params, session=session))
    turn = opened.turn
    if req.stream:
        return EventStreamResponse(chat_events(ctx, turn), on_close=opened.close, timeout=opened.timeout)
    try:
        choices = await until_disconnect(request.receive, collect_chat(turn, ctx.n), opened.timeout)
    except ClientDisconnected:
        return Response(status_code=STATUS_CLIENT_CLOSED)
    finally:
        opened.close()
    return JSONResponse(chat_response(ctx, choices, turn.usage))


def chat_response(ctx: ChatContext, choices: list[ChatChoice], usage: Usage) -> dict[str, Any]:
    body = ctx.head("chat.completion")
    body["choices"] = [
        {"index": i, "message": c.message(), "logprobs": ctx.logprobs(c.logprobs), "finish_reason": c.finish_reason}
        for i, c in enumerate(choices)
    ]
    body["usage"] = usage.as_dict()
    return body


async def chat_events(ctx: ChatContext, turn: ChatTurn) -> AsyncIterator[str]:
    yield "".join(
        ctx.chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        for i in range(ctx.n)
    )
    try:
        async for batch in turn.events():
            events = []
            for e in batch:
                if e.content or e.tool_calls or (ctx.with_logprobs and e.logprobs):
                    events.append(ctx.chunk({"index": e.index, "delta": stream_delta(e),
                                             "logprobs": ctx.logprobs(e.logprobs), "finish_reason": None}))
                if e.finish_reason is not None:
                    events.append(ctx.chunk({"index": e.index, "delta": {}, "logprobs": None,
                                             "finish_reason": e.finish_reason}))
            if events:
                yield "".join(events)
    except Exception as exc:  # the headers are out: report in-band, then end the stream
        yield error_event(exc)  # ends with [DONE]
        return
    if ctx.include_usage:
        body = ctx.head("chat.completion.chunk")
        body["choices"] = []
        body["usage"] = turn.usage.as_dict()
        yield sse_event(body)
    yield DONE
