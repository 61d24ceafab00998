"""`EngineReplica`: one engine replica of the cluster, as a Ray Serve deployment. It runs the whole
single-machine app (build_app) in-process and serves the ingress's relayed requests through it,
so every route behaves on a replica as it does on `layerserve serve` alone.

Before a session's request runs, the replica adopts the session from the shared journal directory
if it is not live here (a session whose replica died, or that an earlier ingress placed
elsewhere); while another replica holds it, the answer is a 421 naming that replica, and the
ingress asks again there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator

from ray import serve

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp

from layerserve.api.anthropic_surface import SURFACES
from layerserve.api.auth import ApiKeyCheck
from layerserve.api.errors import APIError, error_response
from layerserve.cluster.relay import Lifespan, RelayRequest, RelayStart, Socket, run_http
from layerserve.cluster.route import Route
from layerserve.config import EngineConfig, ServerConfig
from layerserve.sessions.journal import OwnedElsewhere

log = logging.getLogger("layerserve.cluster")

REPLICA_HEADER = b"x-layerserve-replica"  # which replica answered (kept for the client with --debug)
OWNER_HEADER = b"x-layerserve-owner"  # on a 421: the replica that holds the session
PID_HEADER = b"x-layerserve-pid"  # the replica's process (kept for the client with --debug)
ORDER_HEADER = b"x-layerserve-created-ms"  # on a session list: {id: creation ms}, the order's hidden key
MISDIRECTED = 421
LOAD_POLL_S = 0.1


class EngineReplica:
    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig) -> None:
        from layerserve.api.app import build_app

        context = serve.get_replica_context()
        self.name = context.replica_id.to_full_id_str()
        self.app = build_app(engine_config, dataclasses.replace(server_config, replica=self.name))
        self.auth = ApiKeyCheck(server_config.api_key)
        self.state = self.app.state.server
        self.lifespan = Lifespan(self.app)
        await self.lifespan.startup()
        while self.state.sessions is None and self.state.load_error is None:  # the model loads on a thread
            await asyncio.sleep(LOAD_POLL_S)
        if self.state.load_error is not None:
            raise RuntimeError(f"the model failed to load: {self.state.load_error}")
        self.sockets: dict[str, Socket] = {}
        log.info("replica %s ready (pid %d)", self.name, os.getpid())

    def _headers(self) -> list[tuple[bytes, bytes]]:
        return [(REPLICA_HEADER, self.name.encode()), (PID_HEADER, str(os.getpid()).encode())]

    async def _adopt(self, route: Route, req: RelayRequest) -> tuple[str | None, ASGIApp | None]:
        """Adopt the route's session here if need be (for a caller with the API key): (the replica
        that holds it, if another does; an error response, if it cannot be adopted)."""
        if route.session_id is None or route.kind != "session":
            return None, None
        try:
            await self.auth(HTTPConnection(req.scope()))  # type: ignore[arg-type]  (it reads the headers)
            await self.state.sessions.adopt(route.session_id)
        except OwnedElsewhere as exc:
            return exc.owner, None
        except APIError as exc:
            return None, error_response(exc, SURFACES.for_path(req.path))
        return None, None

    async def http(self, route: Route, req: RelayRequest) -> AsyncIterator[RelayStart | bytes]:
        owner, refusal = await self._adopt(route, req)
        if owner is not None:  # the ingress asks that replica instead (the body is never shown)
            yield RelayStart(MISDIRECTED, (*self._headers(), (OWNER_HEADER, owner.encode())))
            return
        extra = self._headers()
        if req.method == "GET" and req.path == "/v1/sessions":  # the ingress merges lists in creation order
            created = {s.id: s.created_ms for s in self.state.sessions.list()}
            extra.append((ORDER_HEADER, json.dumps(created).encode()))
        async for item in run_http(refusal or self.app, req):
            if isinstance(item, RelayStart):
                item = RelayStart(item.status, (*item.headers, *extra))
            yield item

    async def ws(self, route: Route, conn_id: str, req: RelayRequest) -> AsyncIterator[dict]:
        """A session socket's outbound ASGI messages; the first item names this replica (or, as
        `{"type": "layerserve.owner"}`, the replica to ask instead)."""
        owner, refusal = await self._adopt(route, req)
        if owner is not None:
            yield {"type": "layerserve.owner", "owner": owner}
            return
        if refusal is not None:  # no key, or no room to restore the session: refuse the upgrade
            yield {"type": "layerserve.replica", "replica": self.name}
            yield {"type": "websocket.close", "code": 1008, "reason": "refused"}
            return
        socket = self.sockets[conn_id] = Socket(self.app, req)  # before the first item: inbound may follow it
        yield {"type": "layerserve.replica", "replica": self.name}
        try:
            async for message in socket.run():
                yield message
        finally:
            self.sockets.pop(conn_id, None)

    async def ws_send(self, route: Route, conn_id: str, message: dict) -> bool:
        """One inbound message for a relayed socket; False when the socket is gone."""
        socket = self.sockets.get(conn_id)
        if socket is None:
            return False
        socket.deliver(message)
        return True

    async def check_health(self) -> None:
        self.state.ready()  # raises while the engine is dead or draining: Ray restarts the replica

    async def __del__(self) -> None:
        self.state.draining = True
        await self.lifespan.shutdown()
