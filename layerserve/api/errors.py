"""Every error the server returns, from one mapping table, in its route's envelope.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` with OpenAI's status codes.
Handlers raise typed exceptions; `install_error_handlers` turns each into a response by looking
its class up in ERROR_TABLE (most specific class first), so no handler builds an error by hand.
Routes of another API (Anthropic's /v1/messages) name their own `Envelope` in `ErrorSurfaces`:
the same kind and message, written in that API's shape.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from layerserve.engine.async_engine import EngineDeadError
from layerserve.engine.core import InvalidRequest
from layerserve.text.chat_template import TemplateError

log = logging.getLogger("layerserve.api")


class APIError(Exception):
    """Base of the errors handlers raise; the table gives status and type, `code` may refine it."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(APIError):
    """The request is malformed or asks for something out of range (400)."""


class NotSupportedError(InvalidRequestError):
    """A valid OpenAI field this server does not implement; rejected rather than ignored (400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param, "unsupported_parameter")


class AuthenticationError(APIError):
    """Missing or wrong API key (401)."""


class NotFoundError(APIError):
    """Unknown route or unknown model id (404)."""


class ConflictError(APIError):
    """The session is busy, the id is taken, or a limit on sessions is reached (409)."""


class BodyTooLargeError(APIError):
    """The request body is over the configured limit (413)."""


class ModelNotReadyError(APIError):
    """The model is still loading, or failed to load (503)."""


class EngineRequestError(APIError):
    """The engine failed while running the request (500)."""


class TooManyRequestsError(APIError):
    """The waiting queue is full (429, with a Retry-After header)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, None, "queue_full")
        self.retry_after = retry_after


class RequestTimeoutError(APIError):
    """The request ran past its timeout and was stopped (408)."""


class DrainingError(APIError):
    """The server is shutting down and takes no new requests (503)."""


class ReplicaUnavailableError(APIError):
    """The cluster's replica for the request died or cannot be reached (503)."""


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    type: str
    code: str | None = None


INVALID = "invalid_request_error"

# Exception class -> what the client sees. Looked up along the exception's MRO.
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    InvalidRequestError: ErrorKind(400, INVALID),
    InvalidRequest: ErrorKind(400, INVALID),  # the engine's own validation (context length, token ids)
    TemplateError: ErrorKind(400, INVALID, "invalid_messages"),
    RequestValidationError: ErrorKind(400, INVALID),
    pydantic.ValidationError: ErrorKind(400, INVALID),
    AuthenticationError: ErrorKind(401, INVALID, "invalid_api_key"),
    NotFoundError: ErrorKind(404, INVALID),
    ConflictError: ErrorKind(409, "conflict_error"),
    BodyTooLargeError: ErrorKind(413, INVALID, "request_too_large"),
    TooManyRequestsError: ErrorKind(429, "rate_limit_error", "queue_full"),
    RequestTimeoutError: ErrorKind(408, "timeout_error", "request_timeout"),
    DrainingError: ErrorKind(503, "server_error", "shutting_down"),
    ReplicaUnavailableError: ErrorKind(503, "server_error", "replica_unavailable"),
    ModelNotReadyError: ErrorKind(503, "server_error", "model_not_ready"),
    EngineDeadError: ErrorKind(503, "server_error", "engine_unavailable"),
    EngineRequestError: ErrorKind(500, "server_error", "engine_error"),
    Exception: ErrorKind(500, "server_error"),
}

# Errors Starlette raises itself (routing), by status.
STATUS_TABLE: dict[int, ErrorKind] = {
    404: ErrorKind(404, INVALID, "unknown_url"),
    405: ErrorKind(405, INVALID, "method_not_allowed"),
    413: ErrorKind(413, INVALID, "request_too_large"),
}


def error_body(message: str, kind: ErrorKind, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": code or kind.code}}


# An error's kind, message, param and code -> the status and body a client of one API expects.
Envelope = Callable[[ErrorKind, str, "str | None", "str | None"], tuple[int, dict[str, Any]]]


def openai_envelope(kind: ErrorKind, message: str, param: str | None = None,
                    code: str | None = None) -> tuple[int, dict[str, Any]]:
    return kind.status, error_body(message, kind, param, code)


@dataclass(frozen=True, slots=True)
class ErrorSurfaces:
    """Which envelope a path's errors are written in: the first matching prefix's, else OpenAI's."""

    prefixes: tuple[tuple[str, Envelope], ...] = ()

    def for_path(self, path: str) -> Envelope:
        for prefix, envelope in self.prefixes:
            if path == prefix or path.startswith(prefix + "/"):
                return envelope
        return openai_envelope


def kind_of(exc: BaseException) -> ErrorKind:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[Exception]


def explain(exc: BaseException) -> tuple[ErrorKind, str, str | None, str | None]:
    """The kind of `exc`, the message its client sees, and its param and code."""
    kind = kind_of(exc)
    if isinstance(exc, (pydantic.ValidationError, RequestValidationError)):
        message, param = validation_message(exc.errors())
        return kind, message, param, None
    if isinstance(exc, (APIError, InvalidRequest)):
        return kind, str(exc), exc.param, exc.code
    if isinstance(exc, (TemplateError, EngineDeadError)):
        return kind, str(exc), None, None
    return kind, f"The server had an error while processing your request (error id {error_id(exc)}).", None, None


def describe(exc: BaseException) -> tuple[ErrorKind, dict[str, Any]]:
    """The status/type of `exc` and its OpenAI envelope."""
    kind, message, param, code = explain(exc)
    return kind, error_body(message, kind, param, code)


def error_id(exc: BaseException) -> str:
    """A reference for an unexpected error: in the client's message and in the log line, never the
    exception's own text (it can carry internals)."""
    ref = getattr(exc, "_layerserve_error_id", None)
    if ref is None:
        ref = uuid.uuid4().hex[:16]
        try:
            exc._layerserve_error_id = ref  # type: ignore[attr-defined]
        except AttributeError:  # an exception type with __slots__
            pass
    return ref


def log_internal(exc: BaseException, what: str) -> None:
    """Log a 5xx with its traceback; unexpected ones under the id their client was given."""
    if isinstance(exc, (ModelNotReadyError, EngineDeadError, DrainingError, ReplicaUnavailableError)):
        return
    if isinstance(exc, APIError):
        log.error("%s: %s", what, exc, exc_info=exc)
    else:
        log.error("%s (error id %s)", what, error_id(exc), exc_info=exc)


def error_response(exc: BaseException, envelope: Envelope = openai_envelope) -> JSONResponse:
    kind, message, param, code = explain(exc)
    if kind.status >= 500:
        log_internal(exc, "internal error")
    status, body = envelope(kind, message, param, code)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, TooManyRequestsError) else None
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, surfaces: ErrorSurfaces = ErrorSurfaces()) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, surfaces.for_path(request.url.path))

    async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = STATUS_TABLE.get(exc.status_code, ErrorKind(exc.status_code, INVALID))
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        status, body = surfaces.for_path(request.url.path)(kind, message, None, None)
        return JSONResponse(body, status_code=status, headers=exc.headers)

    app.add_exception_handler(StarletteHTTPException, handle_http)
    for cls in ERROR_TABLE:
        if cls is not Exception:  # Starlette re-raises what its `Exception` handler served: see below
            app.add_exception_handler(cls, handle)
    app.add_middleware(UnhandledErrors, surfaces=surfaces)


class UnhandledErrors:
    """Answers any unexpected exception with the 500 envelope and keeps the connection usable
    (Starlette's own last-resort handler re-raises, and the server then drops the connection)."""

    def __init__(self, app: ASGIApp, surfaces: ErrorSurfaces = ErrorSurfaces()) -> None:
        self.app = app
        self.surfaces = surfaces

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # half a response is out: let the server end the connection
                raise
            await error_response(exc, self.surfaces.for_path(scope["path"]))(scope, receive, send)


# ---- validation errors -> one clear sentence --------------------------------------------------
_TYPE_LABEL = re.compile(r"^[a-z-]+\[.*\]$|^(str|int|float|bool|none|dict|list)$")
_MISSING = object()


def _param(loc: tuple[Any, ...], data: Any = _MISSING) -> str:
    """Dotted path of a pydantic location, without pydantic's union-branch labels ("str",
    "list[...]", the tag of a discriminated union). With the request `data`, the path follows the
    keys that really exist in it, which tells a field from a branch label exactly."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if item == "body" and i == 0:
            continue  # FastAPI's prefix
        last = i == len(loc) - 1
        if isinstance(item, int):
            if isinstance(data, list) and 0 <= item < len(data):
                data = data[item]
            parts.append(f"[{item}]")
        elif data is _MISSING:
            if not _TYPE_LABEL.match(item):
                parts.append(("." if parts else "") + item)
        elif not last and loc[i + 1] == item:
            pass  # a discriminated union's tag that equals its field name ("function", "function")
        elif isinstance(data, dict) and item in data:
            data = data[item]
            parts.append(("." if parts else "") + item)
        elif last and not _TYPE_LABEL.match(item):
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def validation_message(errors: list[dict[str, Any]], data: Any = _MISSING) -> tuple[str, str | None]:
    """Message and `param` for the first failing field. Where a union's branches all failed, the
    deepest location is the branch the client meant; branches failing at one spot are joined."""
    if not errors:
        return "Invalid request.", None
    top = errors[0]["loc"][:1]
    params = [_param(tuple(e["loc"]), data) for e in errors if e["loc"][:1] == top]
    param = max(params, key=lambda p: p.count(".") + p.count("["))
    same = [e for e in errors if _param(tuple(e["loc"]), data) == param]
    first = same[0]
    if first["type"] == "missing":
        return f"Missing required parameter: '{param}'.", param
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if first["type"] in ("json_invalid", "json_type"):
        return "We could not parse the JSON body of your request. Send a JSON object.", None
    messages = list(dict.fromkeys(e["msg"] for e in same))
    where = f" for '{param}'" if param else ""
    return f"Invalid value{where}: {'; or '.join(messages)}.", param or None
