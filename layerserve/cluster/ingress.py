"""The ingress: the one HTTP endpoint of a cluster (Ray Serve's proxy hands it every request), an
ASGI app that relays each request to an engine replica through a deployment handle, routed by the
request's `Route` (route.py, router.py), and answers what spans replicas itself: `GET
/v1/sessions` lists every replica's sessions, `GET /metrics` is every replica's page with a
`replica` label, plus the ingress's own routing counters.

Streams are relayed chunk by chunk. A replica that dies mid-request fails only the requests it
had: a 503 in the route's error envelope (`replica_unavailable`) if nothing was sent yet, else an
in-band error event that ends the stream as the route's API ends streams. A session request that
lands on a replica while another holds the session is redirected there once (421 + owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayError, RayTaskError
from starlette.types import Message, Receive, Scope, Send

from layerserve.api.anthropic_surface import PREFIX as MESSAGES_PREFIX
from layerserve.api.anthropic_surface import SURFACES, anthropic_error_event
from layerserve.api.connection import error_event
from layerserve.api.errors import BodyTooLargeError, EngineRequestError, ReplicaUnavailableError, explain
from layerserve.cluster.merge import merge_metrics, merge_sessions, short_name
from layerserve.cluster.relay import RelayRequest, RelayStart
from layerserve.cluster.replica import MISDIRECTED, ORDER_HEADER, OWNER_HEADER, PID_HEADER, REPLICA_HEADER
from layerserve.cluster.route import SESSION_PATH, Route, route_for

log = logging.getLogger("layerserve.cluster")

INTERNAL_HEADERS = (REPLICA_HEADER, OWNER_HEADER, PID_HEADER, ORDER_HEADER)


@dataclass(frozen=True, slots=True)
class IngressSettings:
    debug: bool = False  # responses keep the headers naming the replica that answered (and its pid)
    max_body_bytes: int = 16 << 20
    replicas: int = 1  # the most engine replicas there may be (fan-out asks that many ranks)


@dataclass(slots=True)
class Answer:
    """A whole relayed response (fan-out collects these)."""

    replica: str
    start: RelayStart
    body: bytes


class Ingress:
    """The ingress's ASGI app. `replicas` is the engine deployment's handle."""

    def __init__(self, replicas, settings: IngressSettings) -> None:
        self.replicas = replicas
        self.settings = settings
        self.routed: Counter[tuple[str, str]] = Counter()  # (replica, route kind) -> requests
        self.failures = 0  # requests whose replica died or could not be reached
        self.redirects = 0  # session requests sent on to the replica holding the session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)

    # ---- HTTP ----------------------------------------------------------------------------
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        body = await self._read_body(receive)
        if body is None:
            await self._send_error(send, path, BodyTooLargeError(
                f"The request body is larger than this server's limit of {self.settings.max_body_bytes} bytes."))
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        route, body = route_for(scope["method"], path, headers, body)
        req = RelayRequest("http", scope["method"], path, scope.get("query_string", b""),
                           tuple((bytes(k), bytes(v)) for k, v in scope["headers"]), body,
                           tuple(scope["client"]) if scope.get("client") else None)
        if scope["method"] == "GET" and path == "/v1/sessions":
            await self._fan_out_sessions(req, send)
        elif scope["method"] == "GET" and path == "/metrics":
            await self._fan_out_metrics(req, send)
        else:
            await self._relay(route, req, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _open(self, route: Route, req: RelayRequest):
        """The replica's stream and its RelayStart, redirected once to the session's holder."""
        while True:
            stream = self.replicas.options(stream=True).http.remote(route, req)
            try:
                start = await stream.__anext__()
            except BaseException:
                stream.cancel()
                raise
            owner = (start.header(OWNER_HEADER) or b"").decode()
            if start.status != MISDIRECTED or not owner or route.pin is not None:
                return stream, start
            stream.cancel()
            self.redirects += 1
            route = dataclasses.replace(route, pin=owner)

    async def _relay(self, route: Route, req: RelayRequest, send: Send) -> None:
        try:
            stream, start = await self._open(route, req)
        except (RayError, StopAsyncIteration) as exc:
            self.failures += 1
            await self._send_error(send, req.path, _unavailable(exc))
            return
        if start.status == MISDIRECTED:  # still not the holder: it is held where the router cannot reach
            stream.cancel()
            self.failures += 1
            await self._send_error(send, req.path, ReplicaUnavailableError(
                f"The replica holding session '{route.session_id}' cannot be reached; retry shortly."))
            return
        self._count(start, route)
        await send({"type": "http.response.start", "status": start.status, "headers": self._client_headers(start)})
        tail = b""
        try:
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except RayError as exc:
            self.failures += 1
            log.warning("replica %s failed mid-response on %s: %s", start.header(REPLICA_HEADER), req.path,
                        type(exc).__name__)
            if not (start.header(b"content-type") or b"").startswith(b"text/event-stream"):
                raise  # a body cut short must not end like a whole one: the connection drops instead
            tail = _stream_error(req.path, _unavailable(exc)).encode()
        except BaseException:
            stream.cancel()  # the client is gone: so is the replica's work for it
            raise
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _collect(self, route: Route, req: RelayRequest) -> Answer:
        stream, start = await self._open(route, req)
        body = b"".join([chunk async for chunk in stream])
        return Answer((start.header(REPLICA_HEADER) or b"?").decode(), start, body)

    async def _fan_out(self, req: RelayRequest) -> tuple[list[Answer], int]:
        """Every replica's answer to `req`, and how many calls failed. Asks ranks 0..N-1 (N: the most
        replicas there may be; the router wraps ranks past the live ones, and answers from one
        replica count once). One call at a time: the calls a request makes share its Ray request
        id, and Ray's router cannot route two of them at once (it matches replicas to requests by
        that id)."""
        unique: dict[str, Answer] = {}
        failed = 0
        for rank in range(self.settings.replicas):
            try:
                answer = await self._collect(Route("rank", rank=rank), req)
            except (RayError, StopAsyncIteration):
                failed += 1
                continue
            unique.setdefault(answer.replica, answer)
        return list(unique.values()), failed

    async def _fan_out_sessions(self, req: RelayRequest, send: Send) -> None:
        answers, failed = await self._fan_out(req)
        refused = next((a for a in answers if a.start.status in (401, 403)), None)
        if refused is not None:  # the key is wrong for every replica alike
            await self._send_whole(send, refused.start.status, self._client_headers(refused.start), refused.body)
            return
        failed += sum(a.start.status != 200 for a in answers)  # draining, or still loading
        answers = [a for a in answers if a.start.status == 200]
        if not answers:
            await self._send_error(send, req.path, ReplicaUnavailableError("No replica could be reached."))
            return
        created_ms: dict[str, int] = {}
        for a in answers:
            created_ms.update(json.loads(a.start.header(ORDER_HEADER) or b"{}"))
        body = merge_sessions([json.loads(a.body) for a in answers], created_ms)
        headers = [(b"content-type", b"application/json"),
                   (b"x-layerserve-replicas-answered", str(len(answers)).encode())]
        if failed:
            headers.append((b"x-layerserve-replicas-unreachable", str(failed).encode()))
        await self._send_whole(send, 200, headers, json.dumps(body, separators=(",", ":")).encode())

    async def _fan_out_metrics(self, req: RelayRequest, send: Send) -> None:
        answers, failed = await self._fan_out(req)
        pages = {a.replica: a.body.decode() for a in answers if a.start.status == 200}
        failed += len(answers) - len(pages)
        await self._send_whole(send, 200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
                               merge_metrics(pages, self._own_metrics(len(pages), failed)).encode())

    def _own_metrics(self, answered: int, unreachable: int) -> str:
        lines = ["# HELP layerserve:cluster_replicas Replicas that answered this scrape",
                 "# TYPE layerserve:cluster_replicas gauge", f"layerserve:cluster_replicas {answered}",
                 "# HELP layerserve:cluster_replicas_unreachable Replicas that failed this scrape",
                 "# TYPE layerserve:cluster_replicas_unreachable gauge",
                 f"layerserve:cluster_replicas_unreachable {unreachable}",
                 "# HELP layerserve:routed_requests_total Requests the ingress relayed, by replica and route kind",
                 "# TYPE layerserve:routed_requests_total counter"]
        lines += [f'layerserve:routed_requests_total{{replica="{short_name(r)}",route="{kind}"}} {n}'
                  for (r, kind), n in sorted(self.routed.items())]
        lines += ["# HELP layerserve:route_redirects_total Session requests sent on to the replica holding the session",
                  "# TYPE layerserve:route_redirects_total counter",
                  f"layerserve:route_redirects_total {self.redirects}",
                  "# HELP layerserve:replica_failures_total Requests whose replica died or could not be reached",
                  "# TYPE layerserve:replica_failures_total counter",
                  f"layerserve:replica_failures_total {self.failures}"]
        return "\n".join(lines) + "\n"

    def _count(self, start: RelayStart, route: Route) -> None:
        self.routed[((start.header(REPLICA_HEADER) or b"?").decode(), route.kind)] += 1

    def _client_headers(self, start: RelayStart) -> list[tuple[bytes, bytes]]:
        keep = (REPLICA_HEADER, PID_HEADER) if self.settings.debug else ()
        return [(k, v) for k, v in start.headers if k.lower() not in INTERNAL_HEADERS or k.lower() in keep]

    async def _send_whole(self, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _send_error(self, send: Send, path: str, exc: BaseException) -> None:
        kind, message, param, code = explain(exc)
        status, body = SURFACES.for_path(path)(kind, message, param, code)
        await self._send_whole(send, status, [(b"content-type", b"application/json")], json.dumps(body).encode())

    # ---- WebSocket -------------------------------------------------------------------------
    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        connect = await receive()
        if connect["type"] != "websocket.connect":
            return
        match = SESSION_PATH.fullmatch(scope["path"])
        if match is None or not scope["path"].endswith("/ws"):
            await send({"type": "websocket.close", "code": 1008})
            return
        route = Route("session", session_id=match.group(1), load=False)
        req = RelayRequest("websocket", "GET", scope["path"], scope.get("query_string", b""),
                           tuple((bytes(k), bytes(v)) for k, v in scope["headers"]), b"",
                           tuple(scope["client"]) if scope.get("client") else None,
                           scope.get("scheme", "ws"), tuple(scope.get("subprotocols") or ()))
        conn_id = uuid.uuid4().hex
        try:
            stream, replica = await self._open_socket(route, conn_id, req)
        except (RayError, StopAsyncIteration, ReplicaUnavailableError):
            self.failures += 1
            await send({"type": "websocket.close", "code": 1011, "reason": "replica unavailable"})
            return
        self.routed[(replica, "session")] += 1
        pinned = dataclasses.replace(route, pin=replica)
        inbound = asyncio.ensure_future(self._socket_inbound(pinned, conn_id, receive))
        outbound = asyncio.ensure_future(self._socket_outbound(stream, scope, send))
        try:
            await asyncio.wait((inbound, outbound), return_when=asyncio.FIRST_COMPLETED)
            lost = outbound.done() and outbound.exception() is not None or (
                inbound.done() and (inbound.exception() is not None or inbound.result() is False))
            if lost:  # the replica went away (or dropped the socket) under it
                self.failures += 1
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": 1011, "reason": "replica unavailable"})
        finally:
            for task in (inbound, outbound):
                task.cancel()
            await asyncio.gather(inbound, outbound, return_exceptions=True)
            stream.cancel()

    async def _socket_outbound(self, stream, scope: Scope, send: Send) -> None:
        """The replica's messages to the client, until the socket closes."""
        denial = "websocket.http.response" in (scope.get("extensions") or {})
        async for message in stream:
            if message["type"].startswith("websocket.http.response") and not denial:
                if message["type"] == "websocket.http.response.start":  # a refusal the proxy cannot relay
                    await send({"type": "websocket.close", "code": 1008})
                continue
            await send(message)

    async def _open_socket(self, route: Route, conn_id: str, req: RelayRequest):
        for _ in range(2):
            stream = self.replicas.options(stream=True).ws.remote(route, conn_id, req)
            try:
                first = await stream.__anext__()
            except BaseException:
                stream.cancel()
                raise
            if first["type"] == "layerserve.replica":
                return stream, first["replica"]
            stream.cancel()
            if not first["owner"] or route.pin is not None:
                break
            self.redirects += 1
            route = dataclasses.replace(route, pin=first["owner"])
        raise ReplicaUnavailableError("The session's replica could not be found.")

    async def _socket_inbound(self, route: Route, conn_id: str, receive: Receive) -> bool:
        """The client's messages to the replica, in order: True when the client left, False when
        the replica no longer has the socket."""
        while True:
            message: Message = await receive()
            delivered = await self.replicas.ws_send.remote(route, conn_id, message)
            if message["type"] == "websocket.disconnect":
                return True
            if not delivered:
                return False


def _unavailable(exc: BaseException) -> Exception:
    if isinstance(exc, RayTaskError) and not isinstance(exc.cause, RayError):
        log.error("a replica raised: %s", exc)
        return EngineRequestError("The replica failed while running the request.")
    return ReplicaUnavailableError("The replica serving this request stopped before it finished; retry the request.")


def _stream_error(path: str, exc: Exception) -> str:
    if path == MESSAGES_PREFIX or path.startswith(MESSAGES_PREFIX + "/"):
        return anthropic_error_event(exc)
    return error_event(exc)


def ingress_deployment(settings: IngressSettings) -> Any:
    """The ingress as a Ray Serve deployment class (bound to the engine deployment in launch.py)."""
    from ray import serve

    @serve.ingress()
    class LayerserveIngress:
        def __init__(self, replicas) -> None:
            self.ingress = Ingress(replicas, settings)

        def __serve_build_asgi_app__(self) -> Ingress:
            return self.ingress

    return LayerserveIngress
