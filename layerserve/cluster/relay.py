"""Running an ASGI app for a request that arrived elsewhere: the replica's half of the ingress's
relay. A request crosses as a `RelayRequest`; its response comes back as a `RelayStart` and then
body chunks (bytes), one item of a stream each; a socket's outbound ASGI messages come back as
they are, and its inbound ones arrive through `Socket.deliver`.

Leaving the stream early (the client went away, so Ray cancels the call) tells the app
`http.disconnect` (or `websocket.disconnect`), which aborts its engine request as a closed
connection would, and the app is cancelled if it has not ended `GRACE_S` later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

GRACE_S = 2.0
_END = object()


@dataclass(frozen=True, slots=True)
class RelayRequest:
    type: str  # "http" or "websocket"
    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes = b""
    client: tuple[str, int] | None = None
    scheme: str = "http"
    subprotocols: tuple[str, ...] = ()

    def scope(self) -> dict[str, Any]:
        scope: dict[str, Any] = {
            "type": self.type, "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "scheme": self.scheme, "path": self.path, "raw_path": self.path.encode(), "root_path": "",
            "query_string": self.query_string, "headers": list(self.headers), "client": self.client,
            "server": ("127.0.0.1", 0), "state": {},
        }
        if self.type == "http":
            scope["method"] = self.method
        else:
            scope["subprotocols"] = list(self.subprotocols)
            scope["extensions"] = {"websocket.http.response": {}}
        return scope


@dataclass(frozen=True, slots=True)
class RelayStart:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


async def run_http(app: ASGIApp, req: RelayRequest) -> AsyncIterator[RelayStart | bytes]:
    """The app's response to `req`: its RelayStart, then its body chunks."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body = [{"type": "http.request", "body": req.body, "more_body": False}]

    async def receive() -> Message:
        if body:
            return body.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        out.put_nowait(message)

    task = asyncio.ensure_future(app(req.scope(), receive, send))
    task.add_done_callback(lambda _: out.put_nowait(_END))
    complete = False
    try:
        while True:
            message = await out.get()
            if message is _END:
                task.result()  # an app that ended without a response raises here
                raise RuntimeError("the app ended without a complete response")
            if message["type"] == "http.response.start":
                yield RelayStart(message["status"], tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ())))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    complete = True
                    return
    finally:
        gone.set()
        if not complete:
            await _wind_down(task)


class Socket:
    """One relayed WebSocket on the replica: the app's side of it."""

    def __init__(self, app: ASGIApp, req: RelayRequest) -> None:
        self.app = app
        self.req = req
        self.inbound: asyncio.Queue = asyncio.Queue()
        self.inbound.put_nowait({"type": "websocket.connect"})

    def deliver(self, message: Message) -> None:
        self.inbound.put_nowait(message)

    async def run(self) -> AsyncIterator[Message]:
        """The app's outbound messages, until it closes the socket or ends."""
        out: asyncio.Queue = asyncio.Queue()

        async def send(message: Message) -> None:
            out.put_nowait(message)

        task = asyncio.ensure_future(self.app(self.req.scope(), self.inbound.get, send))
        task.add_done_callback(lambda _: out.put_nowait(_END))
        try:
            while True:
                message = await out.get()
                if message is _END:
                    task.result()
                    return
                yield message
                if message["type"] == "websocket.close" or (
                        message["type"] == "websocket.http.response.body" and not message.get("more_body")):
                    return
        finally:
            self.inbound.put_nowait({"type": "websocket.disconnect", "code": 1001})
            await _wind_down(task)


async def _wind_down(task: asyncio.Future) -> None:
    """Let an app that was told the client is gone finish; cancel it after GRACE_S."""
    if task.done():
        return
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
        await asyncio.wait_for(asyncio.shield(task), GRACE_S)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class Lifespan:
    """Runs an ASGI app's lifespan (startup, then shutdown) as a server would."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._inbound: asyncio.Queue = asyncio.Queue()
        self._outbound: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Future | None = None

    async def startup(self) -> None:
        async def send(message: Message) -> None:
            self._outbound.put_nowait(message)

        self._task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                                    self._inbound.get, send))
        await self._step("lifespan.startup")

    async def shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            await self._step("lifespan.shutdown")

    async def _step(self, kind: str) -> None:
        self._inbound.put_nowait({"type": kind})
        message = await self._outbound.get()
        if message["type"] != kind + ".complete":
            raise RuntimeError(f"{kind} failed: {message.get('message', message['type'])}")
