"""LayerScale's session routes, `/v1/sessions*`: lifecycle, push, warm, generate, flash queries,
events (SSE dialect B). The WebSocket is in session_ws.py; the session logic in layerserve.sessions.

Streams: `generate` speaks dialect A (`{"text"}` frames, a `{"done": true, ...}` frame, then
`[DONE]`); `events` dialect B (`event:` lines, no `[DONE]`, `: heartbeat` after 15 s of silence).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from layerserve.api.chat_prompt import chat_turn_request, plan_turn
from layerserve.api.connection import DONE, STATUS_CLIENT_CLOSED, ClientDisconnected, EventStreamResponse, \
    error_event, sse_event, until_disconnect
from layerserve.api.errors import InvalidRequestError, NotFoundError
from layerserve.api.protocol import ChatCompletionRequest, parse_request
from layerserve.api.session_protocol import MAX_STOP_BYTES, FlashRequest, GenerateRequest, PushRequest, \
    SessionCreateRequest
from layerserve.api.state import Runtime, ServerState, server_state
from layerserve.engine.request import SamplingParams
from layerserve.sessions.context import turn_tokens
from layerserve.sessions.session import Session
from layerserve.sessions.store import SessionStore
from layerserve.sessions.work import Answer, Question

HEARTBEAT_S = 15.0


def _store(request: Request) -> tuple[ServerState, Runtime, SessionStore]:
    state = server_state(request)
    rt = state.ready()
    return state, rt, state.sessions


async def _body(request: Request, model):
    raw = await request.body()
    return parse_request(model, raw if raw.strip() else b"{}")


# ---- lifecycle ---------------------------------------------------------------------------
async def create_session(request: Request) -> Response:
    _, _, store = _store(request)
    req = await _body(request, SessionCreateRequest)
    session = store.create(req.id, req.window, req.pre_decode)
    return JSONResponse(session.as_dict())


async def list_sessions(request: Request) -> Response:
    _, _, store = _store(request)
    return JSONResponse({"object": "list", "data": [s.as_dict() for s in store.list()]})


async def get_session(request: Request, session_id: str) -> Response:
    _, _, store = _store(request)
    session = store.get(session_id, touch=False)
    body = session.as_dict()  # last_used: the time before this lookup
    session.touch()
    return JSONResponse(body)


async def delete_session(request: Request, session_id: str) -> Response:
    _, _, store = _store(request)
    session = await store.delete(session_id)
    return JSONResponse({"id": session.id, "object": "session.deleted", "deleted": True})


# ---- push --------------------------------------------------------------------------------
async def push(request: Request, session_id: str) -> Response:
    _, _, store = _store(request)
    req = await _body(request, PushRequest)
    session = store.get(session_id)  # after the body: a DELETE may have come in while it was read
    ack = session.push(store.check_entries(session, req.entries()))
    store.work.wake(session)
    return JSONResponse(ack)


# ---- warm turns --------------------------------------------------------------------------
async def warm(request: Request, session_id: str) -> Response:
    state, rt, store = _store(request)
    req = parse_request(ChatCompletionRequest, await request.body())
    session = store.get(session_id)
    session.check_free()  # a warm turn while a turn is in flight: 409
    turn = chat_turn_request(req, state.config)
    entries = session.entry_ids() if session.has_data else None

    def prompt() -> list[int]:
        plan = plan_turn(turn, rt)
        return turn_tokens(rt, plan.messages, plan.tools, turn.template_kwargs, entries)

    ids = await rt.offload(prompt)
    rt.engine.core.validate(ids, SamplingParams(max_tokens=0))  # a conversation past the context: 400
    out, reason = await store.work.warm(session, ids)
    version = session.data_version if reason == "cancelled" else session.diverged(ids)
    cached, held = (out.cached_tokens, out.held_tokens) if out is not None else (0, 0)
    return JSONResponse({"id": f"warm-{uuid.uuid4().hex}", "object": "session.warm", "session_id": session.id,
                         "finish_reason": reason, "prompt_tokens": len(ids), "cached_tokens": cached,
                         "prefix_cached_tokens": cached - held, "data_version": version})


# ---- generate ----------------------------------------------------------------------------
def _question(req: GenerateRequest, rt: Runtime) -> Question:
    if not req.prompt.strip():
        raise InvalidRequestError("'prompt' must be a non-empty string.", "prompt")
    stops = req.stops()
    for stop in stops:
        if not stop or len(stop.encode()) > MAX_STOP_BYTES:
            raise InvalidRequestError(f"Each stop sequence must be 1 to {MAX_STOP_BYTES} bytes.", "stop")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise InvalidRequestError("Set 'max_completion_tokens' or 'max_tokens', not both with different values.",
                                  "max_tokens")
    extra = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None and req.reasoning_effort != "none":
        extra["reasoning_effort"] = req.reasoning_effort
    params = SamplingParams(max_tokens=req.max_tokens or req.max_completion_tokens, temperature=float(req.temperature),
                            top_p=float(req.top_p), seed=req.seed, ignore_eos=req.ignore_eos, stop=stops,
                            logprobs=2 if req.fast_answer else None)
    return Question(req.prompt, params, extra or None)


def _usage(ans: Answer) -> dict[str, Any]:
    details: dict[str, int] = {"cached_tokens": ans.cached_tokens}
    if ans.cached_tokens - ans.held_tokens:
        details["prefix_cached_tokens"] = ans.cached_tokens - ans.held_tokens
    return {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
            "total_tokens": ans.prompt_tokens + ans.completion_tokens, "prompt_tokens_details": details}


async def generate(request: Request, session_id: str) -> Response:
    state, rt, store = _store(request)
    req = await _body(request, GenerateRequest)
    session = store.get(session_id)
    question = _question(req, rt)
    head = {"id": f"gen-{uuid.uuid4().hex}", "object": "session.generation", "session_id": session.id}
    fq = store.work.flash_hit(session, question)
    if fq is not None:
        store.work.counters.flash_hits += 1
        result = {**head, "text": fq.value, "finish_reason": "stop", "data_version": session.data_version,
                  "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "flash": True, "flash_id": fq.id,
                  "confidence": fq.confidence}
        return _instant(result, req.stream)
    session.claim("generate")  # 409 while a turn or another question is on the session
    claim = _Claim(session, "generate")
    streaming = False  # once the stream is returned, its end releases the claim
    try:
        await session.take_lock()
        claim.locked = True
        if req.fast_answer and not question.extra:
            hit = await _fast_answer(store, session, question, req)
            if hit is not None:
                claim.close()
                return _instant({**head, **hit, "data_version": session.data_version}, req.stream)
        if req.stream:
            streaming = True
            return EventStreamResponse(_generate_events(store, session, question, head, claim), on_close=claim.close)
        try:
            ans = await until_disconnect(request.receive, store.work.answer(session, question, background=False,
                                                                             kind="generate"))
        except ClientDisconnected:
            return Response(status_code=STATUS_CLIENT_CLOSED)
        return JSONResponse({**head, "text": ans.text, "finish_reason": ans.finish_reason,
                             "data_version": session.data_version, "usage": _usage(ans)})
    finally:
        if not streaming:
            claim.close()


class _Claim:
    """A foreground claim on a session, released once (the response's end)."""

    def __init__(self, session: Session, kind: str) -> None:
        self.session = session
        self.kind = kind
        self.locked = False
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.locked:
            self.session.lock.release()
        self.session.release(self.kind)


async def _fast_answer(store: SessionStore, session: Session, question: Question,
                       req: GenerateRequest) -> dict[str, Any] | None:
    """The speculative ready-position exit: the question's first token, greedy; when its logit gap
    clears `gap_threshold` and exactly one candidate starts with it, that candidate is the answer."""
    probe = Question(question.prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=2), question.extra)
    ans = await store.work.answer(session, probe, background=False, kind="ready")
    if ans.first_gap is None or ans.first_gap < req.gap_threshold or ans.first_token is None:
        return None
    tokenizer = store.rt.tokenizer
    matches = [c for c in req.fast_answer if c and tokenizer.encode_plain(c)[:1] == [ans.first_token]]
    if len(matches) != 1:
        return None
    store.work.counters.ready_exits += 1
    return {"text": matches[0], "finish_reason": "stop", "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "speculative": True, "logit_gap": ans.first_gap}


def _instant(result: dict[str, Any], stream: bool) -> Response:
    if not stream:
        return JSONResponse(result)

    async def events() -> AsyncIterator[str]:
        yield sse_event({"text": result["text"]})
        done = {k: v for k, v in result.items() if k != "text"}
        yield sse_event({"done": True, **done})
        yield DONE

    return EventStreamResponse(events())


async def _generate_events(store: SessionStore, session: Session, question: Question, head: dict[str, Any],
                           claim: _Claim) -> AsyncIterator[str]:
    text_parts: list[str] = []
    out = None
    try:
        async for piece, out in store.work.ask(session, question, background=False):
            if piece:
                text_parts.append(piece)
                yield sse_event({"text": piece})
    except Exception as exc:
        yield error_event(exc)  # ends with [DONE]
        return
    finally:
        claim.close()
    reason = next((d.finish_reason for d in out.deltas if d.finish_reason is not None), None) if out else None
    ans = Answer("".join(text_parts), reason.value if reason else "stop", out.prompt_tokens, out.completion_tokens,
                 out.cached_tokens, out.held_tokens)
    yield sse_event({"done": True, **head, "finish_reason": ans.finish_reason, "data_version": session.data_version,
                     "usage": _usage(ans)})
    yield DONE


# ---- flash queries -----------------------------------------------------------------------
async def add_flash(request: Request, session_id: str) -> Response:
    _, _, store = _store(request)
    req = await _body(request, FlashRequest)
    session = store.get(session_id)
    if not req.query.strip():
        raise InvalidRequestError("'query' must be a non-empty string.", "query")
    fq = session.add_flash(req.query, req.max_tokens)
    store.work.wake(session)
    return JSONResponse(fq.as_dict(session.data_version))


async def list_flash(request: Request, session_id: str) -> Response:
    _, _, store = _store(request)
    session = store.get(session_id)
    return JSONResponse({"object": "list", "data": [f.as_dict(session.data_version) for f in session.flash.values()],
                         "data_version": session.data_version})


async def delete_flash(request: Request, session_id: str, flash_id: str) -> Response:
    _, _, store = _store(request)
    session = store.get(session_id)
    try:
        fid = int(flash_id)
    except ValueError:
        raise InvalidRequestError(f"'{flash_id}' is not a flash query id (an integer).", "flash_id") from None
    if not session.remove_flash(fid):
        raise NotFoundError(f"Session '{session.id}' has no flash query {fid}.", "flash_id", "flash_query_not_found")
    session.touch()
    return JSONResponse({"id": fid, "object": "session.flash_query.deleted", "deleted": True,
                         "remaining": len(session.flash)})


# ---- events ------------------------------------------------------------------------------
def _frame(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def events(request: Request, session_id: str) -> Response:
    _, _, store = _store(request)
    session = store.get(session_id)
    return EventStreamResponse(_session_events(session))


async def _session_events(session: Session) -> AsyncIterator[str]:
    async with session.subscribe() as queue:
        yield _frame("connected", session.connected())
        for fq in list(session.flash.values()):
            if fq.value is not None:
                yield _frame("flash_ready", fq.ready_event())
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                yield ": heartbeat\n\n"
                continue
            if item is None:
                return
            yield _frame(*item)


# ---- debug -------------------------------------------------------------------------------
async def debug_tokens(request: Request, session_id: str) -> Response:
    """(--debug) What the engine holds for a session, and what its durable context is."""
    _, rt, store = _store(request)
    session = store.get(session_id, touch=False)
    ctx = rt.engine.core.held.get(session.id)
    return JSONResponse({"token_ids": list(ctx.token_ids) if ctx else [], "kv_tokens": ctx.num_kv if ctx else 0,
                         "durable": session.durable_tokens(), "data_end": session.data_end,
                         "entries": [e.text for e in session.entries], "pending": list(session.pending),
                         "conversation": session.conversation, "turns": session.turns})
