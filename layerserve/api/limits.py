"""Request body size limit, as a pure ASGI middleware (it must see the body before any handler).

A declared Content-Length over the limit is answered 413 at once, without reading the body; a
chunked body is counted as it is received and BodyTooLargeError is raised into the handler that
is reading it, which the error table turns into the same 413.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from layerserve.api.errors import ERROR_TABLE, BodyTooLargeError, ErrorSurfaces


def _too_large_message(limit: int) -> str:
    return f"Request body too large: the limit is {limit} bytes (see --max-body-bytes)."


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, surfaces: ErrorSurfaces = ErrorSurfaces()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.surfaces = surfaces

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(scope, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(_too_large_message(self.max_bytes))
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        kind = ERROR_TABLE[BodyTooLargeError]
        status, payload = self.surfaces.for_path(scope["path"])(kind, _too_large_message(self.max_bytes), None, None)
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
