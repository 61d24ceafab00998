"""What makes the /v1/messages routes look like Anthropic's API around the shared pipeline: its
error envelope (over the same error table), its in-band stream error, its `request-id` header.

    {"type": "error", "error": {"type": "invalid_request_error", "message": "..."}}

Statuses are the table's, except a full queue, which Anthropic calls 529 overloaded_error.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from layerserve.api.errors import ErrorKind, ErrorSurfaces, explain, log_internal

PREFIX = "/v1/messages"
OVERLOADED = 529
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    OVERLOADED: "overloaded_error",
}
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def anthropic_id(prefix: str) -> str:
    """An id in Anthropic's style: `msg_`, `toolu_` or `req_` and 24 random alphanumerics."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def anthropic_envelope(kind: ErrorKind, message: str, param: str | None = None,
                       code: str | None = None) -> tuple[int, dict[str, Any]]:
    """An `errors.Envelope`: the status and body of an error on an Anthropic route."""
    status = OVERLOADED if kind.code == "queue_full" else kind.status
    error_type = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": error_type, "message": message}}


SURFACES = ErrorSurfaces(((PREFIX, anthropic_envelope),))  # the app's error envelopes, by path


def sse_frame(event: dict[str, Any]) -> str:
    """One Anthropic SSE event: `event: <type>` and its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'), ensure_ascii=False)}\n\n"


def anthropic_error_event(exc: BaseException) -> str:
    """An error met after the stream started, as Anthropic reports it: an `error` event (the SDK
    raises it); the stream then ends."""
    kind, message, param, code = explain(exc)
    if kind.status >= 500:
        log_internal(exc, "stream failed")
    return sse_frame(anthropic_envelope(kind, message, param, code)[1])


class RequestIdHeader:
    """Adds a `request-id` header to every response under PREFIX (errors and streams included),
    as Anthropic's API does; the SDK exposes it as `_request_id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        header = (b"request-id", anthropic_id("req_").encode())

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, with_id)
