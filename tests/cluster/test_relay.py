"""layerserve.cluster.relay: running a small Starlette app for requests that arrived elsewhere, as
a replica does for the ingress (HTTP responses, early disconnects, WebSockets, lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from layerserve.cluster import relay
from layerserve.cluster.relay import Lifespan, RelayRequest, RelayStart, Socket, run_http


class Seen:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.stream_started = asyncio.Event()
        self.stream_ended = asyncio.Event()
        self.ws_disconnects: list[int] = []


def make_app(seen: Seen) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"method": request.method, "path": request.url.path, "query": request.url.query,
                             "body": body.decode(), "header": request.headers.get("x-test")},
                            status_code=201, headers={"x-reply": "yes"})

    async def chunks(request: Request) -> StreamingResponse:
        async def gen():
            for i in range(3):
                yield f"chunk{i};".encode()
        return StreamingResponse(gen(), media_type="text/plain")

    async def forever(request: Request) -> StreamingResponse:
        async def gen():
            try:
                yield b"first"
                seen.stream_started.set()
                await asyncio.sleep(3600)
                yield b"never"
            finally:
                seen.stream_ended.set()
        return StreamingResponse(gen(), media_type="text/plain")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                if text == "bye":
                    await websocket.close(code=1000)
                    return
                await websocket.send_text("echo:" + text)
        except WebSocketDisconnect as e:
            seen.ws_disconnects.append(e.code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        seen.events.append("startup")
        yield
        seen.events.append("shutdown")

    return Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/chunks", chunks),
                             Route("/forever", forever), WebSocketRoute("/ws", ws)], lifespan=lifespan)


def http(path: str, method: str = "GET", body: bytes = b"", headers=(), query: bytes = b"") -> RelayRequest:
    return RelayRequest("http", method, path, query, tuple(headers), body=body, client=("10.0.0.1", 5555))


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def app(seen: Seen) -> Starlette:
    return make_app(seen)


async def collect(gen) -> list:
    return [item async for item in gen]


async def test_json_response_and_request_body(app):
    req = http("/echo", "POST", body=b'{"hello": 1}', headers=[(b"x-test", b"abc"), (b"content-type", b"application/json")],
               query=b"a=1")
    items = await asyncio.wait_for(collect(run_http(app, req)), 5)
    start, *body = items
    assert isinstance(start, RelayStart)
    assert start.status == 201
    assert start.header(b"x-reply") == b"yes"
    assert start.header(b"content-type") == b"application/json"
    assert start.header(b"nope") is None
    assert all(isinstance(b, bytes) for b in body)
    doc = json.loads(b"".join(body))
    assert doc == {"method": "POST", "path": "/echo", "query": "a=1", "body": '{"hello": 1}', "header": "abc"}
    assert int(start.header(b"content-length")) == len(b"".join(body))


async def test_streaming_response_comes_as_chunks(app):
    items = await asyncio.wait_for(collect(run_http(app, http("/chunks"))), 5)
    assert isinstance(items[0], RelayStart) and items[0].status == 200
    assert items[0].header(b"content-type").startswith(b"text/plain")
    assert items[1:] == [b"chunk0;", b"chunk1;", b"chunk2;"]


async def test_unknown_path_is_the_apps_404(app):
    items = await asyncio.wait_for(collect(run_http(app, http("/nowhere"))), 5)
    assert items[0].status == 404


async def test_leaving_early_tells_the_app_the_client_is_gone(app, seen):
    gen = run_http(app, http("/forever"))
    start = await asyncio.wait_for(gen.__anext__(), 5)
    assert start.status == 200
    assert await asyncio.wait_for(gen.__anext__(), 5) == b"first"
    await asyncio.wait_for(seen.stream_started.wait(), 5)
    assert not seen.stream_ended.is_set()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(gen.aclose(), relay.GRACE_S + 3)
    # the app was told (http.disconnect) and ended its stream at once, not cancelled at GRACE_S
    assert seen.stream_ended.is_set()
    assert loop.time() - t0 < relay.GRACE_S / 2


async def test_leaving_early_cancels_an_app_that_ignores_the_disconnect(monkeypatch):
    monkeypatch.setattr(relay, "GRACE_S", 0.2)
    cancelled = asyncio.Event()

    async def stubborn(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        try:
            await asyncio.sleep(3600)  # never reads receive()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    gen = run_http(stubborn, http("/"))
    assert (await gen.__anext__()).status == 200
    assert await gen.__anext__() == b"x"
    await asyncio.wait_for(gen.aclose(), 3)
    assert cancelled.is_set()


async def test_an_app_that_ends_without_a_response_raises():
    async def silent(scope, receive, send):
        await receive()

    with pytest.raises(RuntimeError, match="without a complete response"):
        await asyncio.wait_for(collect(run_http(silent, http("/"))), 5)


async def test_websocket_echo_and_close(app, seen):
    sock = Socket(app, RelayRequest("websocket", "GET", "/ws", b"", ()))
    out = sock.run()
    assert (await asyncio.wait_for(out.__anext__(), 5))["type"] == "websocket.accept"
    sock.deliver({"type": "websocket.receive", "text": "hello"})
    assert await asyncio.wait_for(out.__anext__(), 5) == {"type": "websocket.send", "text": "echo:hello"}
    sock.deliver({"type": "websocket.receive", "text": "again"})
    assert (await asyncio.wait_for(out.__anext__(), 5))["text"] == "echo:again"
    sock.deliver({"type": "websocket.receive", "text": "bye"})
    close = await asyncio.wait_for(out.__anext__(), 5)
    assert close["type"] == "websocket.close" and close["code"] == 1000
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(out.__anext__(), 5)
    assert seen.ws_disconnects == []


async def test_leaving_a_websocket_early_tells_the_app(app, seen):
    sock = Socket(app, RelayRequest("websocket", "GET", "/ws", b"", ()))
    out = sock.run()
    assert (await asyncio.wait_for(out.__anext__(), 5))["type"] == "websocket.accept"
    await asyncio.wait_for(out.aclose(), relay.GRACE_S + 3)
    assert seen.ws_disconnects == [1001]


async def test_lifespan_runs_startup_and_shutdown(app, seen):
    life = Lifespan(app)
    await asyncio.wait_for(life.startup(), 5)
    assert seen.events == ["startup"]
    await asyncio.wait_for(life.shutdown(), 5)
    assert seen.events == ["startup", "shutdown"]


async def test_lifespan_startup_failure_raises():
    @contextlib.asynccontextmanager
    async def broken(app):
        raise ValueError("no model")
        yield

    life = Lifespan(Starlette(lifespan=broken))
    with pytest.raises(RuntimeError, match="(?s)lifespan.startup failed: .*no model"):
        await asyncio.wait_for(life.startup(), 5)
    with pytest.raises(ValueError, match="no model"):  # Starlette re-raises it after startup.failed
        await life._task
