"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the chat pipeline.

A request is translated into a `TurnRequest` (messages_turn.py), prepared and run exactly as a
chat completion (`prepare_turn`, `ChatTurn`), and the turn's `ChoiceEvent`s are written as
Anthropic content blocks. The same `BlockWriter` builds the stream's events and the JSON body:

    message_start
      content_block_start (text | tool_use)
      content_block_delta (text_delta | input_json_delta) ...
      content_block_stop                                     ... one group per block
    message_delta (stop_reason, stop_sequence, usage)
    message_stop
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from layerserve.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from layerserve.api.anthropic_surface import anthropic_error_event, anthropic_id, sse_frame
from layerserve.api.chat_prompt import TurnRequest, plan_turn, prepare_turn, prompt_ids
from layerserve.api.chat_turn import ChatTurn, ChoiceEvent
from layerserve.api.connection import STATUS_CLIENT_CLOSED, ClientDisconnected, EventStreamResponse, until_disconnect
from layerserve.api.messages_turn import messages_sampling, messages_turn_request
from layerserve.api.protocol import parse_request
from layerserve.api.runs import Usage
from layerserve.api.state import Runtime, server_state
from layerserve.api.turn_http import open_session_turn, open_turn


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    """Chat's finish_reason as Anthropic's stop_reason."""
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def usage_body(usage: Usage) -> dict[str, int]:
    """Anthropic's usage: prompt tokens read from the prefix cache apart from the rest."""
    body = {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}
    if usage.in_session and usage.prefix_cached_tokens:  # a session turn: the prefix cache's part of the reads
        body["prefix_cached_tokens"] = usage.prefix_cached_tokens
    return body


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the `input` object (a call cut off by max_tokens has none to parse)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(slots=True)
class BlockWriter:
    """One choice's events -> Anthropic stream events; `blocks` accumulates the finished content."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None
    _open: bool = False
    _arguments: str = ""  # of the open tool_use block

    def feed(self, event: ChoiceEvent) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if event.content:
            if not (self._open and self.blocks[-1]["type"] == "text"):
                out += self._start({"type": "text", "text": ""})
            self.blocks[-1]["text"] += event.content
            out.append(self._delta({"type": "text_delta", "text": event.content}))
        for piece in event.tool_calls:
            if piece.id is not None:
                out += self._start({"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}})
            if piece.arguments:
                self._arguments += piece.arguments
                out.append(self._delta({"type": "input_json_delta", "partial_json": piece.arguments}))
        if event.finish_reason is not None:
            self.finish_reason, self.stop_sequence = event.finish_reason, event.stop_sequence
            out += self._close()
        return out

    @property
    def stop_reason(self) -> str:
        return stop_reason(self.finish_reason, self.stop_sequence)

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._close()
        self.blocks.append(block)
        self._open = True
        self._arguments = ""
        return out + [{"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": dict(block)}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}

    def _close(self) -> list[dict[str, Any]]:
        if not self._open:
            return []
        self._open = False
        if self.blocks[-1]["type"] == "tool_use":
            self.blocks[-1]["input"] = _tool_input(self._arguments)
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]


def message_head(msg_id: str, model: str) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": []}


async def create_message(request: Request) -> Response:
    state = server_state(request)
    rt: Runtime = state.ready()
    req = parse_request(MessagesRequest, await request.body())
    params = messages_sampling(req)
    turn_request = messages_turn_request(req, state.config)
    session = await open_session_turn(request, state.sessions)  # the x-layerscale-session-id header
    try:
        return await _message(request, state, rt, req, params, turn_request, session)
    except BaseException:
        if session is not None:
            session.close()
        raise


async def _message(request: Request, state, rt: Runtime, req: MessagesRequest, params, turn_request,
                   session) -> Response:
    plan, ids, first_params = await rt.offload(prepare_turn, turn_request, params, rt, session)  # off the loop
    msg_id = anthropic_id("msg_")
    model = req.model or state.config.served_model_name  # an absent model: the server's name
    opened = open_turn(request, state, rt, msg_id, ids, 1,  # 529 when the queue is full
                       lambda: ChatTurn(rt, msg_id, plan, params, ids, None, state.metrics, first_params=first_params,
                                        call_ids=lambda: anthropic_id("toolu_"), session=session))
    turn = opened.turn
    if req.stream:
        return EventStreamResponse(message_events(msg_id, model, len(ids), turn), on_close=opened.close,
                                   timeout=opened.timeout, error_frame=anthropic_error_event)
    try:
        writer = await until_disconnect(request.receive, _collect(turn), opened.timeout)
    except ClientDisconnected:
        return Response(status_code=STATUS_CLIENT_CLOSED)
    finally:
        opened.close()
    body = message_head(msg_id, model)
    body.update(content=writer.blocks, stop_reason=writer.stop_reason, stop_sequence=writer.stop_sequence,
                usage=usage_body(turn.usage))
    return JSONResponse(body)


async def _collect(turn: ChatTurn) -> BlockWriter:
    writer = BlockWriter()
    async for batch in turn.events():
        for event in batch:
            writer.feed(event)
    return writer


async def message_events(msg_id: str, model: str, prompt_tokens: int, turn: ChatTurn) -> AsyncIterator[str]:
    message = message_head(msg_id, model)
    message.update(stop_reason=None, stop_sequence=None,
                   usage={"input_tokens": prompt_tokens, "output_tokens": 0, "cache_read_input_tokens": 0,
                          "cache_creation_input_tokens": 0})
    yield sse_frame({"type": "message_start", "message": message})
    writer = BlockWriter()
    try:
        async for batch in turn.events():
            frames = [sse_frame(e) for event in batch for e in writer.feed(event)]
            if frames:
                yield "".join(frames)
    except Exception as exc:  # the headers are out: report in-band, then end the stream
        yield anthropic_error_event(exc)
        return
    delta = {"stop_reason": writer.stop_reason, "stop_sequence": writer.stop_sequence}
    yield sse_frame({"type": "message_delta", "delta": delta, "usage": usage_body(turn.usage)})
    yield sse_frame({"type": "message_stop"})


async def count_tokens(request: Request) -> Response:
    state = server_state(request)
    rt = state.ready()
    req = parse_request(CountTokensRequest, await request.body())
    turn_request = messages_turn_request(req, state.config)
    return JSONResponse({"input_tokens": len(await rt.offload(_prompt_ids, turn_request, rt))})


def _prompt_ids(turn: TurnRequest, rt: Runtime) -> list[int]:
    """The first engine request's prompt, as `prepare_turn` builds it (no grammar compiled)."""
    return prompt_ids(plan_turn(turn, rt), rt, turn.template_kwargs)
