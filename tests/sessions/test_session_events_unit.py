"""The session event stream's framing and lifetime, in-process: heartbeat comments in silence,
replayed flash answers, a stream that ends when the session goes or falls too far behind."""

from __future__ import annotations

import asyncio
import pathlib

from layerserve.api import sessions as routes
from layerserve.sessions.context import DataLayout
from layerserve.sessions.journal import Journal, SessionRecord
from layerserve.sessions.session import EVENT_QUEUE, Limits, Session


def make_session(tmp_path: pathlib.Path) -> Session:
    journal = Journal(tmp_path)
    rec = SessionRecord("s1", 0, None, False)
    journal.create(rec)
    return Session(rec, DataLayout([1, 2]), journal, Limits(), lambda text: [3])


async def test_silence_gets_heartbeats_and_a_deleted_session_ends_the_stream(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(routes, "HEARTBEAT_S", 0.05)
    session = make_session(tmp_path)
    fq = session.add_flash("How is it?", 8)
    fq.value, fq.data_version, fq.confidence = "fine", 0, 1.5
    stream = routes._session_events(session)
    assert (await anext(stream)).startswith("event: connected\ndata: {\"session_id\":\"s1\"")
    assert (await anext(stream)).startswith("event: flash_ready\ndata: {\"id\":1,")  # replayed
    assert await anext(stream) == ": heartbeat\n\n"  # nothing happened for HEARTBEAT_S
    session.data_updated()
    assert (await anext(stream)).startswith("event: data_updated\ndata: {\"data_version\":0,")
    session.close_subscribers()  # what DELETE does
    assert [frame async for frame in stream] == []
    assert not session.subscribers


async def test_a_subscriber_too_far_behind_is_ended(tmp_path) -> None:
    session = make_session(tmp_path)
    async with session.subscribe() as queue:
        for _ in range(EVENT_QUEUE + 1):
            session.data_updated()
        items = [queue.get_nowait() for _ in range(queue.qsize())]
        assert items[-1] is None  # its stream ends; the client resyncs from `connected`
        assert queue not in session.subscribers
    await asyncio.sleep(0)
