"""`GET /v1/sessions/{id}/ws`: LayerScale's session socket.

Server -> client messages are `{"type": kind, "data": {...}}`: `connected` first, replayed
`flash_ready`, then live `data_updated` / `flash_ready`, and `push_ack` / `pong` / `error` replies.
Client -> server: `{"type": "push", "data": str | [str]}`, `{"type": "ping"}`, `{"type": "close"}`.
A malformed message gets a JSON `error` event and the socket stays open. A refused upgrade is
plain HTTP in the usual error envelope (401 before the handshake, 404, 400). uvicorn sends a
protocol ping every 15 s and drops inbound frames over 16 MiB (cli.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState
from uvicorn.protocols.utils import ClientDisconnected

from layerserve.api.errors import APIError, error_response
from layerserve.sessions.session import Session


def _msg(kind: str, data: Any) -> str:
    return json.dumps({"type": kind, "data": data}, separators=(",", ":"), ensure_ascii=False)


def session_socket(auth):
    """The WebSocket endpoint; `auth` is the app's ApiKeyCheck (it reads only the headers)."""

    async def endpoint(websocket: WebSocket, session_id: str) -> None:
        state = websocket.app.state.server
        try:
            await auth(websocket)
            state.ready()
            session = state.sessions.get(session_id)
        except APIError as exc:
            await websocket.send_denial_response(error_response(exc))
            return
        await websocket.accept()
        await _serve(websocket, state.sessions, session)

    return endpoint


async def _serve(websocket: WebSocket, store, session: Session) -> None:
    try:
        await _pump(websocket, store, session)
    except (WebSocketDisconnect, ClientDisconnected, OSError):
        pass  # the client is gone; nothing is left to tell it


async def _pump(websocket: WebSocket, store, session: Session) -> None:
    async with session.subscribe() as queue:
        await websocket.send_text(_msg("connected", session.connected()))
        for fq in list(session.flash.values()):
            if fq.value is not None:
                await websocket.send_text(_msg("flash_ready", fq.ready_event()))
        receive = asyncio.ensure_future(websocket.receive())
        event = asyncio.ensure_future(queue.get())
        try:
            while True:
                done, _ = await asyncio.wait({receive, event}, return_when=asyncio.FIRST_COMPLETED)
                if receive in done:
                    message = receive.result()
                    if message["type"] == "websocket.disconnect" or not await _handle(websocket, store, session,
                                                                                     message):
                        return
                    receive = asyncio.ensure_future(websocket.receive())
                if event in done:
                    item = event.result()
                    if item is None:  # the session is gone (or this socket fell too far behind)
                        return
                    await websocket.send_text(_msg(*item))
                    event = asyncio.ensure_future(queue.get())
        finally:
            for task in (receive, event):
                task.cancel()
            if websocket.application_state is WebSocketState.CONNECTED:
                try:
                    await websocket.close()
                except (RuntimeError, WebSocketDisconnect, ClientDisconnected, OSError):
                    pass


async def _handle(websocket: WebSocket, store, session: Session, message: dict[str, Any]) -> bool:
    """One client message; False when the client asked to close."""
    raw = message.get("text") if message.get("text") is not None else (message.get("bytes") or b"").decode(
        "utf-8", "replace")
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    kind = body.get("type") if isinstance(body, dict) else None
    if kind == "close":
        return False
    if kind == "ping":
        await websocket.send_text(_msg("pong", None))
        return True
    if kind == "push":
        data = body.get("data")
        entries = [data] if isinstance(data, str) else data
        if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
            await websocket.send_text(_msg("error", {"message": "'data' must be a string or a non-empty array of "
                                                                "strings.", "code": 400}))
            return True
        if session.deleted:
            return False
        try:
            ack = session.push(store.check_entries(session, entries))
        except APIError as exc:
            await websocket.send_text(_msg("error", {"message": exc.message, "code": 400}))
            return True
        ack.pop("pending_bytes", None)
        await websocket.send_text(_msg("push_ack", ack))  # before any event the push causes
        store.work.wake(session)
        return True
    await websocket.send_text(_msg("error", {"message": "Expected a JSON message with 'type' push, ping or close.",
                                             "code": 400}))
    return True
