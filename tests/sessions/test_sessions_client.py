"""LayerScale's official client (`layerscale==0.8.0`, sync and async) against the real server's
session routes: lifecycle, session chat turns (both surfaces), push, generate, flash queries, warm
turns, the speculative fast answer, the events stream, and every refusal with the client's typed
error. Every wait is a poll with a deadline; every session a test creates is deleted by it."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from layerscale import (APIStatusError, AsyncLayerScale, BadRequestError, ConflictError, LayerScale,
                        NotFoundError)
from layerscale.types import GenerationDone
from layerscale.types.sessions import (ConnectedEvent, DataUpdatedEvent, FlashReadyEvent, GenerationTextChunk,
                                       Session)
from server_process import MAX_BODY_BYTES, Server
from session_helpers import WAIT_S, Pump, refused_by

MAX_SESSIONS = 24  # conftest's --max-sessions
DATA = ["AAPL 187.44 +0.5%", "MSFT 420.21 -0.1%"]


def uid(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def session(ls: LayerScale, **params: Any) -> Iterator[Session]:
    """A fresh session (a unique id unless one is given), deleted at the end."""
    s = ls.sessions.create(**{"id": uid(), **params})
    try:
        yield s
    finally:
        delete_quietly(ls, s.id)


def delete_quietly(ls: LayerScale, sid: str) -> None:
    """Delete, waiting out a turn that is still ending (409 while busy); gone already is fine."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            ls.sessions.delete(sid)
            return
        except NotFoundError:
            return
        except ConflictError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_for(what: str, probe: Callable[[], Any], deadline_s: float = WAIT_S, interval: float = 0.05) -> Any:
    """Poll `probe` until it returns something truthy; fail (not hang) past the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(interval)


def chat_turn(ls: LayerScale, sid: str, messages: list[dict[str, Any]], max_tokens: int = 8):
    return ls.chat.create(messages=messages, max_tokens=max_tokens, temperature=0, session_id=sid)


# ---- lifecycle ----------------------------------------------------------------------------
def test_create_default_and_custom_ids_window_pre_decode(ls: LayerScale) -> None:
    before = int(time.time()) - 1
    default = ls.sessions.create()
    try:
        assert default.id.startswith("sess_") and len(default.id) > len("sess_")
        assert default.object == "session"
        assert default.turns == 0 and default.tokens == 0 and default.kv_tokens == 0 and default.data_end == 0
        assert default.data_version == 0 and default.pending == 0 and default.busy is False
        assert default.pre_decode is False and default.window is None and default.ready is False
        assert before <= default.created <= time.time() + 1
        sid = uid("custom")
        with session(ls, id=sid, window=256, pre_decode=True) as custom:
            assert custom.id == sid and custom.window == 256 and custom.pre_decode is True
            got = ls.sessions.get(sid)
            assert got.id == sid and got.window == 256 and got.pre_decode is True
    finally:
        ls.sessions.delete(default.id)
    with pytest.raises(BadRequestError):  # window has a floor (16 tokens)
        ls.sessions.create(id=uid(), window=8)


def test_list_is_sorted_by_creation_and_get_reports_last_used(ls: LayerScale) -> None:
    ids = [uid(f"order{i}") for i in range(3)]
    created = []
    try:
        for sid in reversed(ids):  # ids sort the other way round from creation
            created.append(ls.sessions.create(id=sid))
            time.sleep(0.003)  # the order is by creation millisecond, then id (the client's docs): no ties
        listed = ls.sessions.list()
        assert listed.object == "list"
        mine = [s.id for s in listed.data if s.id in ids]
        assert mine == [s.id for s in created]
        stamps = [s.created for s in listed.data]
        assert stamps == sorted(stamps)
        first = ls.sessions.get(ids[0])
        assert created[-1].created <= first.last_used <= time.time() + 1
        again = ls.sessions.get(ids[0])
        assert again.last_used >= first.last_used
    finally:
        for sid in ids:
            delete_quietly(ls, sid)


def test_delete_then_get_and_delete_again_are_404(ls: LayerScale) -> None:
    sid = ls.sessions.create(id=uid()).id
    gone = ls.sessions.delete(sid)
    assert gone.id == sid and gone.deleted is True and gone.object == "session.deleted"
    with pytest.raises(NotFoundError):
        ls.sessions.get(sid)
    with pytest.raises(NotFoundError):
        ls.sessions.delete(sid)
    assert sid not in [s.id for s in ls.sessions.list().data]


# ---- session chat turns -------------------------------------------------------------------
def test_chat_turns_resume_from_the_session(ls: LayerScale) -> None:
    with session(ls) as s:
        m1 = [{"role": "user", "content": "Tell me about cats."}]
        r1 = chat_turn(ls, s.id, m1)
        p1, c1 = r1.usage.prompt_tokens, r1.usage.completion_tokens
        assert ls.sessions.get(s.id).turns == 1
        m2 = [*m1, {"role": "assistant", "content": r1.choices[0].message.content},
              {"role": "user", "content": "And dogs?"}]
        usage = None
        text = ""
        with ls.chat.stream(messages=m2, max_tokens=8, temperature=0, session_id=s.id,
                            stream_options={"include_usage": True}) as stream:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    text += choice.delta.content or ""
        assert text and usage is not None
        cached2 = usage.prompt_tokens_details.cached_tokens
        # turn 1's prompt and (nearly) all of its reply come from the session
        assert cached2 >= p1 and cached2 >= p1 + c1 - 2, (p1, c1, usage)
        assert cached2 < usage.prompt_tokens
        got = ls.sessions.get(s.id)
        assert got.turns == 2 and got.busy is False and got.kv_tokens + 1 >= got.data_end > 0
        # an edited earlier message still works; only the common prefix is cached
        m3 = [{"role": "user", "content": "Tell me about horses."}, *m2[1:]]
        r3 = chat_turn(ls, s.id, m3)
        assert r3.choices[0].message.content is not None
        cached3 = r3.usage.prompt_tokens_details.cached_tokens
        assert cached3 < cached2 and cached3 < p1, (cached3, cached2, p1)
        assert ls.sessions.get(s.id).turns == 3
        # the Anthropic surface takes the same session (the client sends the header)
        m4 = [*m3, {"role": "assistant", "content": r3.choices[0].message.content},
              {"role": "user", "content": "Which is bigger?"}]
        r4 = ls.messages.create(messages=m4, max_tokens=8, temperature=0, session_id=s.id)
        assert r4.usage.cache_read_input_tokens >= r3.usage.prompt_tokens, (r4.usage, r3.usage)
        assert ls.sessions.get(s.id).turns == 4


def test_second_request_while_a_turn_is_in_flight_is_409(ls: LayerScale) -> None:
    with session(ls) as s:
        chunks: queue.Queue = queue.Queue()
        stop = threading.Event()

        def long_turn() -> None:
            try:
                with ls.chat.stream(messages=[{"role": "user", "content": "Write a long story."}], max_tokens=200,
                                    ignore_eos=True, session_id=s.id) as stream:
                    for chunk in stream:
                        chunks.put(chunk)
                        if stop.is_set():
                            break  # closing the stream cancels the turn
            except BaseException as exc:  # noqa: BLE001
                chunks.put(exc)
            finally:
                chunks.put(None)

        worker = threading.Thread(target=long_turn, daemon=True)
        worker.start()
        try:
            first = chunks.get(timeout=WAIT_S)
            assert first is not None and not isinstance(first, BaseException), first
            assert ls.sessions.get(s.id).busy is True
            with pytest.raises(ConflictError) as err:
                chat_turn(ls, s.id, [{"role": "user", "content": "hi"}], max_tokens=2)
            assert err.value.status_code == 409 and err.value.code == "session_busy"
            with pytest.raises(ConflictError):
                ls.sessions.generate(s.id, prompt="hi", max_tokens=2)
            with pytest.raises(ConflictError):
                ls.sessions.warm(s.id, messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(ConflictError):
                ls.sessions.delete(s.id)
        finally:
            stop.set()
            worker.join(WAIT_S)
        wait_for("the cancelled turn to release the session", lambda: not ls.sessions.get(s.id).busy)


# ---- push and generate --------------------------------------------------------------------
def test_push_then_generate_is_ephemeral_and_cached(ls: LayerScale) -> None:
    with session(ls) as s:
        ack = ls.sessions.push(s.id, DATA[0])
        assert ack.pushed == 1 and ack.dropped == 0 and ack.total_pushed == 1 and ack.total_dropped == 0
        assert ack.pending >= 0 and ack.pending_bytes >= 0 and ack.data_version == 0
        ack2 = ls.sessions.push(s.id, DATA[1:] + ["NVDA 903.10 +2.1%"], wait=True)
        assert ack2.pushed == 2 and ack2.total_pushed == 3 and ack2.dropped == 0
        got = ls.sessions.get(s.id)
        assert got.pending == 0 and got.kv_tokens + 1 >= got.data_end > 0 and got.data_version > ack2.data_version
        end1 = got.data_end
        ls.sessions.push(s.id, ["GOOG 171.90 +0.3%"], wait=True)
        got = ls.sessions.get(s.id)
        assert got.data_end > end1
        data_end, version = got.data_end, got.data_version

        g1 = ls.sessions.generate(s.id, prompt="Which stock rose the most?", max_tokens=8, temperature=0)
        assert g1.object == "session.generation" and g1.session_id == s.id and g1.id
        assert g1.text and g1.finish_reason in ("stop", "length") and g1.data_version == version
        assert g1.usage.prompt_tokens > data_end and 0 < g1.usage.completion_tokens <= 8
        assert g1.usage.total_tokens == g1.usage.prompt_tokens + g1.usage.completion_tokens
        assert g1.flash is None and g1.speculative is None
        after = ls.sessions.get(s.id)
        assert after.data_end == data_end and after.data_version == version  # ephemeral

        done = None
        text = []
        for chunk in ls.sessions.generate_stream(s.id, prompt="Which stock fell?", max_tokens=8, temperature=0):
            assert done is None, "a frame after the done frame"
            if isinstance(chunk, GenerationDone):
                done = chunk
            else:
                assert isinstance(chunk, GenerationTextChunk)
                text.append(chunk.text)
        assert text and done is not None and done.done is True
        assert done.session_id == s.id and done.data_version == version and done.finish_reason in ("stop", "length")
        assert done.usage.prompt_tokens_details is not None
        assert done.usage.prompt_tokens_details.cached_tokens >= data_end, (done.usage, data_end)
        assert done.usage.completion_tokens == 8 or done.finish_reason == "stop"
        assert ls.sessions.get(s.id).data_end == data_end


# ---- flash queries ------------------------------------------------------------------------
def test_flash_answer_after_push_and_flash_hit(ls: LayerScale) -> None:
    with session(ls) as s:
        query = "Is the market up or down?"
        fq = ls.sessions.flash(s.id, query, max_tokens=6)
        assert fq.object == "session.flash_query" and fq.query == query and fq.max_tokens == 6
        assert fq.fresh is False and fq.value is None and fq.data_version is None
        ack = ls.sessions.push(s.id, DATA)

        def fresh_after_push():
            listed = ls.sessions.list_flash(s.id)
            mine = [f for f in listed.data if f.id == fq.id]
            if mine and mine[0].fresh and listed.data_version > ack.data_version:
                return listed, mine[0]
            return None

        listed, answered = wait_for("a fresh flash answer after the push", fresh_after_push)
        assert listed.object == "list" and answered.value is not None
        assert answered.data_version == listed.data_version and answered.confidence is not None
        assert answered.evaluated_at is not None and answered.evaluated_at <= time.time() + 1
        hit = ls.sessions.generate(s.id, prompt=query)
        assert hit.flash is True and hit.flash_id == fq.id and hit.text == answered.value
        assert hit.data_version == answered.data_version and hit.confidence == answered.confidence
        assert hit.usage.prompt_tokens == 0 and hit.usage.completion_tokens == 0
        assert hit.usage.total_tokens is None and hit.usage.prompt_tokens_details is None
        with pytest.raises(ConflictError):
            ls.sessions.flash(s.id, query)
        removed = ls.sessions.unflash(s.id, fq.id)
        assert removed.id == fq.id and removed.deleted is True and removed.remaining == 0
        with pytest.raises(NotFoundError):
            ls.sessions.unflash(s.id, fq.id)
        assert ls.sessions.list_flash(s.id).data == []


def test_flash_clamps_max_tokens_and_caps_at_20(ls: LayerScale) -> None:
    with session(ls) as s:
        low = ls.sessions.flash(s.id, "q-low", max_tokens=0)
        assert low.max_tokens == 1
        high = ls.sessions.flash(s.id, "q-high", max_tokens=1000)
        assert high.max_tokens == 256
        ls.sessions.unflash(s.id, high.id)  # not left to answer 256 tokens in the background
        for i in range(19):
            ls.sessions.flash(s.id, f"q-{i}", max_tokens=1)
        assert len(ls.sessions.list_flash(s.id).data) == 20
        with pytest.raises(ConflictError) as err:
            ls.sessions.flash(s.id, "q-21st", max_tokens=1)
        assert err.value.code == "too_many_flash_queries"
        with pytest.raises(NotFoundError):
            ls.sessions.unflash(s.id, 999_999)


# ---- warm turns ---------------------------------------------------------------------------
def test_warm_then_covered_then_turn_resumes(ls: LayerScale) -> None:
    with session(ls) as s:
        messages = [{"role": "user", "content": f"Remember the code word {uuid.uuid4().hex[:8]}, then greet me."}]
        warm = ls.sessions.warm(s.id, messages=messages)
        assert warm.object == "session.warm" and warm.session_id == s.id and warm.finish_reason == "warmed"
        assert warm.prompt_tokens > 0 and 0 <= warm.prefix_cached_tokens <= warm.cached_tokens < warm.prompt_tokens
        assert warm.data_version == 0
        again = ls.sessions.warm(s.id, messages=messages)
        assert again.finish_reason == "covered" and again.prompt_tokens == warm.prompt_tokens
        assert again.cached_tokens == again.prompt_tokens
        assert ls.sessions.get(s.id).turns == 0  # a warm turn is not a turn
        r = chat_turn(ls, s.id, messages, max_tokens=4)
        assert r.usage.prompt_tokens == warm.prompt_tokens
        assert r.usage.prompt_tokens_details.cached_tokens >= warm.prompt_tokens - 1
        assert ls.sessions.get(s.id).turns == 1


# ---- the speculative fast answer ----------------------------------------------------------
def test_fast_answer_is_speculative_or_a_normal_answer(ls: LayerScale) -> None:
    with session(ls) as s:
        ls.sessions.push(s.id, ["AAPL rose 2% today.", "MSFT fell 1% today."], wait=True)
        prompt = "Did AAPL go up or down today?"
        # the greedy first token, so that one candidate can start with it
        first = ls.sessions.generate(s.id, prompt=prompt, max_tokens=1, temperature=0).text
        candidates = [f"{first.strip() or first} went up", "zzzz"]
        g = ls.sessions.generate(s.id, prompt=prompt, fast_answer=candidates, gap_threshold=0.0, max_tokens=4)
        if g.speculative:
            assert g.text in candidates and g.logit_gap is not None and g.logit_gap >= 0.0
            assert g.usage.prompt_tokens == 0 and g.usage.completion_tokens == 0 and g.usage.total_tokens is None
        else:
            assert g.usage.prompt_tokens > 0 and g.usage.completion_tokens > 0 and g.text
        threshold = 1.5
        g = ls.sessions.generate(s.id, prompt=prompt, fast_answer=candidates, gap_threshold=threshold, max_tokens=4)
        if g.speculative:
            assert g.text in candidates and g.logit_gap >= threshold
            assert g.usage.prompt_tokens == 0 and g.usage.completion_tokens == 0
        else:
            assert g.speculative is None and g.usage.completion_tokens > 0
        never = ls.sessions.generate(s.id, prompt=prompt, fast_answer=candidates, gap_threshold=1e9, max_tokens=4)
        assert not never.speculative and never.logit_gap is None
        assert never.usage.prompt_tokens > 0 and never.usage.completion_tokens > 0


# ---- the events stream --------------------------------------------------------------------
def test_events_connected_data_updated_flash_ready_and_replay(ls: LayerScale) -> None:
    with session(ls) as s:
        stream = ls.sessions.events(s.id)
        pump = Pump(stream)
        connected = pump.next()
        assert isinstance(connected, ConnectedEvent)
        assert connected.session_id == s.id and connected.data_version == 0 and connected.flash_queries == 0
        fq = ls.sessions.flash(s.id, "Which stock rose?", max_tokens=4)
        ack = ls.sessions.push(s.id, DATA)
        # no GET in between: the open stream alone reports the settle, then the fresh answer
        updated = pump.until(lambda e: isinstance(e, DataUpdatedEvent) and e.data_version > ack.data_version)
        assert updated.pending == 0 and updated.tokens > 0
        ready = pump.until(lambda e: isinstance(e, FlashReadyEvent) and e.data_version >= updated.data_version)
        assert ready.id == fq.id and ready.query == "Which stock rose?" and ready.value
        assert isinstance(ready.confidence, float)
        # reconnecting: connected, then the cached answers replayed
        replay = Pump(ls.sessions.events(s.id))
        again = replay.next()
        assert isinstance(again, ConnectedEvent) and again.flash_queries == 1
        assert again.data_version >= ready.data_version
        replayed = replay.next()
        assert isinstance(replayed, FlashReadyEvent) and replayed.id == fq.id and replayed.value
        ls.sessions.delete(s.id)  # ends both streams
        assert pump.wait_end() and replay.wait_end(), "a deleted session's event streams stay open"
        stream.close()


# ---- refusals -----------------------------------------------------------------------------
def test_unknown_session_is_404_on_every_route(ls: LayerScale) -> None:
    sid = uid("missing")
    msgs = [{"role": "user", "content": "hi"}]
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("get", lambda: ls.sessions.get(sid)),
        ("delete", lambda: ls.sessions.delete(sid)),
        ("push", lambda: ls.sessions.push(sid, "x")),
        ("push list", lambda: ls.sessions.push(sid, ["x", "y"])),
        ("warm", lambda: ls.sessions.warm(sid, messages=msgs)),
        ("generate", lambda: ls.sessions.generate(sid, prompt="hi", max_tokens=1)),
        ("generate_stream", lambda: list(ls.sessions.generate_stream(sid, prompt="hi", max_tokens=1))),
        ("flash", lambda: ls.sessions.flash(sid, "q")),
        ("list_flash", lambda: ls.sessions.list_flash(sid)),
        ("unflash", lambda: ls.sessions.unflash(sid, 1)),
        ("events", lambda: ls.sessions.events(sid)),
        ("chat", lambda: ls.chat.create(messages=msgs, max_tokens=1, session_id=sid)),
        ("chat stream", lambda: list(ls.chat.stream(messages=msgs, max_tokens=1, session_id=sid))),
        ("messages", lambda: ls.messages.create(messages=msgs, max_tokens=1, session_id=sid)),
    ]
    wrong = refused_by(calls, NotFoundError, 404)
    assert not wrong, wrong


def test_bad_ids_and_duplicates(ls: LayerScale) -> None:
    for bad in ("bad id!", "a" * 129, "semi;colon", "dots.no"):
        with pytest.raises(BadRequestError) as err:
            ls.sessions.create(id=bad)
        assert err.value.code == "invalid_session_id"
    with pytest.raises(BadRequestError):
        ls.sessions.get("a" * 200)
    with session(ls) as s:
        with pytest.raises(ConflictError) as err:
            ls.sessions.create(id=s.id)
        assert err.value.code == "session_exists"


def test_bad_push_and_generate_bodies(ls: LayerScale, session_server: Server) -> None:
    with session(ls) as s, httpx.Client(base_url=session_server.base_url, timeout=60) as http:
        for body in ({"data": []}, {"data": [1]}, {"data": ["ok", None]}, {"data": 5}, {}, {"data": "x", "extra": 1}):
            r = http.post(f"/v1/sessions/{s.id}/push", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        with pytest.raises(BadRequestError):  # the client lets an empty list through; the server does not
            ls.sessions.push(s.id, [])
        with pytest.raises(APIStatusError) as err:
            ls.sessions.push(s.id, "x" * (MAX_BODY_BYTES + 1))
        assert err.value.status_code == 413
        assert ls.sessions.get(s.id).pending == 0  # nothing refused was queued
        with pytest.raises(BadRequestError):
            ls.sessions.generate(s.id, prompt="")
        with pytest.raises(BadRequestError):
            ls.sessions.generate(s.id, prompt="   ")
        with pytest.raises(BadRequestError):
            ls.sessions.generate(s.id, prompt="hi", stop=["a", "b", "c", "d", "e"])
        with pytest.raises(BadRequestError):
            ls.sessions.generate(s.id, prompt="hi", stop=["x" * 65])
        with pytest.raises(BadRequestError) as err:
            ls.sessions.generate(s.id, prompt="hi", bogus_field=1)  # type: ignore[call-arg]
        assert "bogus_field" in err.value.message
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 1, "session_id": s.id})
        assert r.status_code == 400 and "session_id" in r.text, r.text
        r = http.post("/v1/messages", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                            "session_id": s.id})
        assert r.status_code == 400 and "session_id" in r.text, r.text
        got = ls.sessions.get(s.id)
        assert got.turns == 0 and got.busy is False


def test_more_than_max_sessions_is_409(ls: LayerScale) -> None:
    live = len(ls.sessions.list().data)
    made: list[str] = []
    try:
        for _ in range(MAX_SESSIONS - live):
            made.append(ls.sessions.create(id=uid("cap")).id)
        with pytest.raises(ConflictError) as err:
            ls.sessions.create(id=uid("cap"))
        assert err.value.code == "too_many_sessions", err.value.message
    finally:
        for sid in made:
            delete_quietly(ls, sid)
    # room again once they are gone
    extra = ls.sessions.create(id=uid("cap"))
    ls.sessions.delete(extra.id)


# ---- the async client ---------------------------------------------------------------------
async def test_async_client_lifecycle_push_generate_events(session_server: Server) -> None:
    async with AsyncLayerScale(session_server.base_url, timeout=300, max_retries=0) as als:
        s = await als.sessions.create(id=uid("async"))
        try:
            events = await als.sessions.events(s.id)
            it = events.__aiter__()
            connected = await asyncio.wait_for(it.__anext__(), WAIT_S)
            assert isinstance(connected, ConnectedEvent) and connected.session_id == s.id
            ack = await als.sessions.push(s.id, DATA, wait=True)
            got = await als.sessions.get(s.id)
            assert got.pending == 0 and got.kv_tokens + 1 >= got.data_end > 0
            assert got.data_version > ack.data_version

            async def data_updated() -> DataUpdatedEvent:
                async for event in it:
                    if isinstance(event, DataUpdatedEvent) and event.data_version > ack.data_version:
                        return event
                raise AssertionError("the event stream ended")

            updated = await asyncio.wait_for(data_updated(), WAIT_S)
            assert updated.data_version == got.data_version

            g = await als.sessions.generate(s.id, prompt="Which stock rose?", max_tokens=6, temperature=0)
            assert g.text and g.data_version == got.data_version and g.usage.completion_tokens > 0
            chunks = [c async for c in await als.sessions.generate_stream(s.id, prompt="Which stock fell?",
                                                                             max_tokens=6, temperature=0)]
            assert chunks and isinstance(chunks[-1], GenerationDone)
            assert all(isinstance(c, GenerationTextChunk) for c in chunks[:-1]) and len(chunks) > 1
            assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= got.data_end
            assert (await als.sessions.get(s.id)).data_end == got.data_end

            fq = await als.sessions.flash(s.id, "Which stock fell?", max_tokens=0)
            assert fq.max_tokens == 1
            assert [f.id for f in (await als.sessions.list_flash(s.id)).data] == [fq.id]
            assert (await als.sessions.unflash(s.id, fq.id)).deleted is True
            with pytest.raises(NotFoundError):
                await als.sessions.unflash(s.id, fq.id)
            assert s.id in [x.id for x in (await als.sessions.list()).data]
            warm = await als.sessions.warm(s.id, messages=[{"role": "user", "content": "Summarise the feed."}])
            assert warm.finish_reason in ("warmed", "covered")
            r = await als.chat.create(messages=[{"role": "user", "content": "Summarise the feed."}], max_tokens=4,
                                      temperature=0, session_id=s.id)
            assert r.usage.prompt_tokens_details.cached_tokens >= warm.prompt_tokens - 1
            assert (await als.sessions.get(s.id)).turns == 1
            await events.close()
        finally:
            with contextlib.suppress(NotFoundError):
                await als.sessions.delete(s.id)
        with pytest.raises(NotFoundError):
            await als.sessions.get(s.id)
        with pytest.raises(NotFoundError):
            await als.sessions.delete(s.id)
