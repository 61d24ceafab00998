"""The session WebSocket through LayerScale's official client (`layerscale==0.8.0`, sync
`SessionSocket` and async `AsyncSessionSocket`), its refused upgrades as typed errors, and a
server started with `--api-key` (sockets and HTTP session routes refused without the key, served
with it; /health open). Socket reads run with a timeout, so a missing event fails the test."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from layerscale import (AsyncLayerScale, AuthenticationError, BadRequestError, LayerScale, NotFoundError,
                        WsConnected, WsDataUpdated, WsError, WsFlashReady, WsPong, WsPushAck)
from server_process import Server, start_server, stop_server
from session_helpers import WAIT_S, Pump, refused_by
from websockets.sync.client import connect as raw_connect

KEY = "secret"


def uid(prefix: str = "ws") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def ws_url(server: Server, sid: str) -> str:
    return server.base_url.replace("http://", "ws://", 1) + f"/v1/sessions/{sid}/ws"


def delete_quietly(ls: LayerScale, sid: str) -> None:
    try:
        ls.sessions.delete(sid)
    except NotFoundError:
        pass


@pytest.fixture
def sid(ls: LayerScale) -> Iterator[str]:
    session_id = ls.sessions.create(id=uid()).id
    try:
        yield session_id
    finally:
        delete_quietly(ls, session_id)


# ---- the sync socket ----------------------------------------------------------------------
def test_sync_socket_push_ack_before_data_updated_ping_errors_close(ls: LayerScale, sid: str) -> None:
    fq = ls.sessions.flash(sid, "Which stock rose?", max_tokens=3)
    ws = ls.sessions.ws(sid)
    pump = Pump(ws)
    try:
        connected = pump.next()
        assert isinstance(connected, WsConnected), pump.seen
        assert connected.data.session_id == sid and connected.data.flash_queries == 1
        ws.push(["AAPL 187.44 +0.5%", "MSFT 420.21 -0.1%"])
        ack = pump.until(lambda e: isinstance(e, (WsPushAck, WsDataUpdated)))
        assert isinstance(ack, WsPushAck), f"data_updated before the push_ack: {pump.seen}"
        assert ack.data.pushed == 2 and ack.data.dropped == 0 and ack.data.total_pushed == 2
        assert ack.data.total_dropped == 0 and ack.data.pending >= 0
        version = ack.data.data_version
        updated = pump.until(lambda e: isinstance(e, WsDataUpdated) and e.data.data_version > version)
        assert updated.data.pending == 0 and updated.data.tokens > 0
        ready = pump.until(lambda e: isinstance(e, WsFlashReady) and e.data.data_version >= updated.data.data_version)
        assert ready.data.id == fq.id and ready.data.query == "Which stock rose?" and ready.data.value
        assert isinstance(ready.data.confidence, float)

        ws.ping()
        assert isinstance(pump.until(lambda e: isinstance(e, (WsPong, WsError))), WsPong)
        ws.push([])  # the client's types let an empty list through; the server answers an error event
        err = pump.until(lambda e: isinstance(e, (WsError, WsPushAck)))
        assert isinstance(err, WsError) and err.data.code == 400 and "data" in err.data.message
        ws.ping()  # still open
        assert isinstance(pump.until(lambda e: isinstance(e, (WsPong, WsError))), WsPong)
        ws.push("GOOG 171.90 +0.3%")
        ack2 = pump.until(lambda e: isinstance(e, WsPushAck))
        assert ack2.data.pushed == 1 and ack2.data.total_pushed == 3
    finally:
        ws.close()
    assert pump.wait_end(), "the socket's iteration did not end after close()"
    ws.close()  # idempotent

    # reconnecting replays the cached flash answer after `connected`
    with ls.sessions.ws(sid) as again:
        replay = Pump(again)
        assert isinstance(replay.next(), WsConnected)
        replayed = replay.next()
        assert isinstance(replayed, WsFlashReady) and replayed.data.id == fq.id and replayed.data.value
        ls.sessions.delete(sid)  # the session is gone: its sockets end
        assert replay.wait_end(), "a deleted session's socket stays open"


def test_invalid_frames_get_error_events_and_the_socket_stays_open(session_server: Server, ls: LayerScale,
                                                                    sid: str) -> None:
    # Frames the client cannot send (raw text, unknown types), straight through `websockets`.
    with raw_connect(ws_url(session_server, sid), open_timeout=WAIT_S) as raw:
        assert json.loads(raw.recv(timeout=WAIT_S))["type"] == "connected"
        for frame in ("not json", "[1, 2]", json.dumps({"type": "bogus"}), json.dumps({"data": "x"}),
                      json.dumps({"type": "push", "data": [1]}), json.dumps({"type": "push"})):
            raw.send(frame)
            reply = json.loads(raw.recv(timeout=WAIT_S))
            assert reply["type"] == "error" and reply["data"]["code"] == 400, (frame, reply)
            assert isinstance(reply["data"]["message"], str) and reply["data"]["message"]
            raw.send(json.dumps({"type": "ping"}))
            assert json.loads(raw.recv(timeout=WAIT_S))["type"] == "pong", frame
    got = ls.sessions.get(sid)
    assert got.pending == 0 and got.data_end == 0  # nothing refused was queued


def test_refused_upgrades_are_typed_errors(ls: LayerScale) -> None:
    with pytest.raises(NotFoundError) as err:
        ls.sessions.ws(uid("missing"))
    assert err.value.status_code == 404
    for bad in ("bad%20id%21", "a" * 200, "semi;colon"):
        with pytest.raises(BadRequestError) as err:
            ls.sessions.ws(bad)
        assert err.value.status_code == 400, bad
    gone = ls.sessions.create(id=uid()).id
    ls.sessions.delete(gone)
    with pytest.raises(NotFoundError):
        ls.sessions.ws(gone)


# ---- the async socket ---------------------------------------------------------------------
async def test_async_socket(session_server: Server, ls: LayerScale, sid: str) -> None:
    async with AsyncLayerScale(session_server.base_url, timeout=300, max_retries=0) as als:
        async with als.sessions.ws(sid) as ws:
            events = ws.__aiter__()

            async def until(pred: Callable[[Any], bool]) -> Any:
                async def scan() -> Any:
                    async for event in events:
                        if pred(event):
                            return event
                    raise AssertionError("the socket closed")

                return await asyncio.wait_for(scan(), WAIT_S)

            connected = await asyncio.wait_for(events.__anext__(), WAIT_S)
            assert isinstance(connected, WsConnected) and connected.data.session_id == sid
            await ws.push("AAPL 187.44 +0.5%")
            ack = await until(lambda e: isinstance(e, (WsPushAck, WsDataUpdated)))
            assert isinstance(ack, WsPushAck) and ack.data.pushed == 1
            updated = await until(lambda e: isinstance(e, WsDataUpdated))
            assert updated.data.data_version > ack.data.data_version and updated.data.pending == 0
            await ws.ping()
            assert isinstance(await until(lambda e: isinstance(e, (WsPong, WsError))), WsPong)
            await ws.push([])
            err = await until(lambda e: isinstance(e, (WsError, WsPushAck)))
            assert isinstance(err, WsError) and err.data.code == 400
            await ws.ping()
            assert isinstance(await until(lambda e: isinstance(e, (WsPong, WsError))), WsPong)
            await ws.close()
            rest = await asyncio.wait_for(_drain(events), WAIT_S)  # ends once closed
            assert all(not isinstance(e, WsPushAck) for e in rest)
        with pytest.raises(NotFoundError):
            async with als.sessions.ws(uid("missing")):
                pass
        for bad in ("bad%20id%21", "a" * 200):
            with pytest.raises(BadRequestError):
                await als.sessions.ws(bad).connect()
    got = ls.sessions.get(sid)
    assert got.pending == 0 and got.data_end > 0


async def _drain(events) -> list[Any]:
    return [e async for e in events]


# ---- a server with --api-key --------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("keyed-server")
    proc, srv = start_server(base / "server.log", "--api-key", KEY, "--session-dir", str(base / "sessions"))
    try:
        yield srv
    finally:
        stop_server(proc)


@pytest.fixture
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERSCALE_API_KEY", raising=False)
    monkeypatch.delenv("LAYERSCALE_LICENSE_KEY", raising=False)


async def test_api_key_guards_sockets_and_session_routes(keyed_server: Server, no_env_key: None) -> None:
    url = keyed_server.base_url
    with LayerScale(url, api_key=KEY, timeout=300, max_retries=0) as keyed, \
            LayerScale(url, timeout=300, max_retries=0) as anon, \
            LayerScale(url, api_key="wrong", timeout=300, max_retries=0) as wrong:
        s = keyed.sessions.create(id=uid("keyed"))
        try:
            msgs = [{"role": "user", "content": "hi"}]
            for client in (anon, wrong):
                calls: list[tuple[str, Callable[[], Any]]] = [
                    ("create", lambda: client.sessions.create(id=uid())),
                    ("list", lambda: client.sessions.list()),
                    ("get", lambda: client.sessions.get(s.id)),
                    ("push", lambda: client.sessions.push(s.id, "x")),
                    ("generate", lambda: client.sessions.generate(s.id, prompt="hi", max_tokens=1)),
                    ("warm", lambda: client.sessions.warm(s.id, messages=msgs)),
                    ("flash", lambda: client.sessions.flash(s.id, "q")),
                    ("list_flash", lambda: client.sessions.list_flash(s.id)),
                    ("unflash", lambda: client.sessions.unflash(s.id, 1)),
                    ("events", lambda: client.sessions.events(s.id)),
                    ("chat", lambda: client.chat.create(messages=msgs, max_tokens=1, session_id=s.id)),
                    ("delete", lambda: client.sessions.delete(s.id)),
                    ("ws", lambda: client.sessions.ws(s.id)),
                ]
                wrong_answers = refused_by(calls, AuthenticationError, 401)
                assert not wrong_answers, wrong_answers
                # an unknown session is refused for the key first, before the lookup
                with pytest.raises(AuthenticationError):
                    client.sessions.ws(uid("missing"))
            async with AsyncLayerScale(url, timeout=300, max_retries=0) as async_anon:
                with pytest.raises(AuthenticationError):
                    await async_anon.sessions.ws(s.id).connect()
                with pytest.raises(AuthenticationError):
                    await async_anon.sessions.get(s.id)
            # /health needs no key
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            assert anon.health.check().ok is True
            # the key opens everything
            got = keyed.sessions.get(s.id)
            assert got.id == s.id and got.pending == 0 and got.turns == 0  # nothing refused reached it
            assert s.id in [x.id for x in keyed.sessions.list().data]
            with keyed.sessions.ws(s.id) as ws:
                pump = Pump(ws)
                assert isinstance(pump.next(), WsConnected)
                ws.push("AAPL 187.44 +0.5%")
                assert isinstance(pump.until(lambda e: isinstance(e, WsPushAck)), WsPushAck)
                ws.ping()
                assert isinstance(pump.until(lambda e: isinstance(e, WsPong)), WsPong)
            async with AsyncLayerScale(url, api_key=KEY, timeout=300, max_retries=0) as async_keyed:
                async with async_keyed.sessions.ws(s.id) as aws:
                    first = await asyncio.wait_for(aws.__aiter__().__anext__(), WAIT_S)
                    assert isinstance(first, WsConnected)
            with pytest.raises(NotFoundError):  # with the key, an unknown session is a 404 again
                keyed.sessions.ws(uid("missing"))
        finally:
            delete_quietly(keyed, s.id)
        with pytest.raises(NotFoundError):
            keyed.sessions.get(s.id)
