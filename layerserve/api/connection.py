"""The client's side of a request: SSE framing, and noticing at once when the client goes away.

Both paths watch the ASGI `receive` channel for `http.disconnect` while the engine works, and
cancel the work when it comes. Cancelling the consumer of an engine iterator aborts that engine
request (its KV blocks are freed at the next step), so a closed tab costs nothing further.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from layerserve.api.errors import RequestTimeoutError, describe, log_internal

log = logging.getLogger("layerserve.api")

T = TypeVar("T")

DONE = "data: [DONE]\n\n"
STATUS_CLIENT_CLOSED = 499  # nginx's "client closed request"; nobody is left to read it


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def sse_event(payload: Any) -> str:
    """One `data:` event carrying `payload` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def error_event(exc: BaseException) -> str:
    """An error met after the stream started, reported in-band as OpenAI does (the SDKs raise it),
    then the stream's normal end, so clients that wait for [DONE] are not left hanging."""
    kind, body = describe(exc)
    if kind.status >= 500:
        log_internal(exc, "stream failed")
    return sse_event(body) + DONE


def timeout_error(seconds: float) -> RequestTimeoutError:
    return RequestTimeoutError(f"The request did not finish within its timeout of {seconds:g} s and was stopped.")


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _settle(*tasks: asyncio.Future) -> None:
    """Cancel `tasks` and wait until they have run their cleanup."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(receive: Receive, work: Awaitable[T], timeout: float | None = None) -> T:
    """Await `work`, cancelling it if the client disconnects first (then ClientDisconnected) or
    `timeout` seconds pass (then RequestTimeoutError). Call only after the body has been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await _settle(task, watcher)
        raise
    if task.done():
        await _settle(watcher)
        return task.result()
    await _settle(task, watcher)
    if watcher.done() and not watcher.cancelled():
        raise ClientDisconnected()
    raise timeout_error(timeout or 0.0)


class EventStreamResponse(Response):
    """A text/event-stream response that stops producing the moment the client disconnects.

    `events` yields ready-framed SSE text. `on_close` runs exactly once when the response ends
    for any reason (finished, disconnected, failed): the place to abort unfinished engine work,
    even if `events` never started (an unstarted generator's `finally` never runs).
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None] | None = None,
                 timeout: float | None = None, error_frame: Callable[[BaseException], str] = error_event) -> None:
        self.events = events
        self.error_frame = error_frame  # the in-band error (and end of stream) of this stream's API
        self.on_close = on_close
        self.timeout = timeout  # seconds; past it the stream ends with `error_frame`
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        timed_out = False
        try:
            done, _ = await asyncio.wait((producer, watcher), timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
            timed_out = not done
        finally:
            await _settle(producer, watcher)
            try:
                await self.events.aclose()  # type: ignore[attr-defined]
            finally:
                if self.on_close is not None:
                    self.on_close()
        if timed_out:
            body = self.error_frame(timeout_error(self.timeout or 0.0)).encode("utf-8")
            try:
                await send({"type": "http.response.body", "body": body, "more_body": False})
            except OSError:
                pass
        elif producer.done() and not producer.cancelled() and producer.exception() is not None:
            log.error("event stream failed", exc_info=producer.exception())

    async def _produce(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for text in self.events:
                await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4 servers report a gone client this way
            pass
