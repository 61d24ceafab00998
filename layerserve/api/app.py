"""`build_app(engine_config, server_config)`: the FastAPI app, with no module-level state.

The model loads in a worker thread after the server starts listening, so `/health` answers 503
while loading and 200 after; every route that needs the model answers 503 until then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from layerserve.api import chat, completions, info, messages, sessions, tokenize
from layerserve.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from layerserve.api.anthropic_surface import SURFACES, RequestIdHeader
from layerserve.api.auth import ApiKeyCheck
from layerserve.api.errors import install_error_handlers
from layerserve.api.limits import BodySizeLimit
from layerserve.api.observe import AccessLog
from layerserve.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from layerserve.api.session_protocol import FlashRequest, GenerateRequest, PushRequest, SessionCreateRequest
from layerserve.api.session_ws import session_socket
from layerserve.api.state import EngineLoader, ServerState
from layerserve.config import EngineConfig, ServerConfig


def _default_loader(config: EngineConfig):
    from layerserve.engine.builder import build_engine

    return build_engine(config, progress=False)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI `requestBody` of a route that parses its raw body with `model` (so /docs and
    schema-driven fuzzers know its shape), with pydantic's `$defs` inlined: the OpenAPI document
    has no `$defs` at its root for them to point to."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
        # an OpenAPI `discriminator` maps to the $refs just inlined; the `oneOf` says the same
        return {key: inline(value) for key, value in node.items()
                if not (key == "discriminator" and isinstance(value, dict) and "mapping" in value)}

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def build_app(engine_config: EngineConfig, server_config: ServerConfig, *,
              loader: EngineLoader = _default_loader) -> FastAPI:
    """The OpenAI-compatible app, with Anthropic's Messages API under /v1/messages. `loader` builds
    (EngineCore, EngineInfo) from the engine config; tests may pass another."""
    state = ServerState(server_config, engine_config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load(loader))
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()  # the worker thread finishes on its own; nothing waits for it
            await state.close()

    app = FastAPI(title="layerserve", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = state
    install_error_handlers(app, SURFACES)
    app.add_middleware(BodySizeLimit, max_bytes=server_config.max_body_bytes, surfaces=SURFACES)

    auth = ApiKeyCheck(server_config.api_key)
    protected = [Depends(auth)]
    routes = [
        ("/v1/chat/completions", chat.create_chat_completion, "POST", ChatCompletionRequest),
        ("/v1/completions", completions.create_completion, "POST", CompletionRequest),
        ("/v1/messages", messages.create_message, "POST", MessagesRequest),
        ("/v1/messages/count_tokens", messages.count_tokens, "POST", CountTokensRequest),
        ("/v1/models", info.list_models, "GET", None),
        ("/v1/models/{model_id:path}", info.retrieve_model, "GET", None),
        ("/tokenize", tokenize.tokenize, "POST", TokenizeRequest),
        ("/detokenize", tokenize.detokenize, "POST", DetokenizeRequest),
        # LayerScale's sessions (layerserve/sessions)
        ("/v1/sessions", sessions.create_session, "POST", SessionCreateRequest),
        ("/v1/sessions", sessions.list_sessions, "GET", None),
        ("/v1/sessions/{session_id}", sessions.get_session, "GET", None),
        ("/v1/sessions/{session_id}", sessions.delete_session, "DELETE", None),
        ("/v1/sessions/{session_id}/push", sessions.push, "POST", PushRequest),
        ("/v1/sessions/{session_id}/warm", sessions.warm, "POST", ChatCompletionRequest),
        ("/v1/sessions/{session_id}/generate", sessions.generate, "POST", GenerateRequest),
        ("/v1/sessions/{session_id}/flash", sessions.add_flash, "POST", FlashRequest),
        ("/v1/sessions/{session_id}/flash", sessions.list_flash, "GET", None),
        ("/v1/sessions/{session_id}/flash/{flash_id}", sessions.delete_flash, "DELETE", None),
        ("/v1/sessions/{session_id}/events", sessions.events, "GET", None),
    ]
    if server_config.debug:
        routes.append(("/debug/sessions/{session_id}/tokens", sessions.debug_tokens, "GET", None))
    for path, endpoint, method, body in routes:
        app.add_api_route(path, endpoint, methods=[method], dependencies=protected,
                          openapi_extra=_json_body(body) if body else None)
    app.add_api_websocket_route("/v1/sessions/{session_id}/ws", session_socket(auth))
    for path in ("/health", "/v1/health"):
        app.add_api_route(path, info.health, methods=["GET"])
    app.add_api_route("/healthz", info.health, methods=["GET"])
    app.add_api_route("/metrics", state.observability.metrics_endpoint, methods=["GET"])
    app.add_middleware(RequestIdHeader)
    app.add_middleware(AccessLog, metrics=state.metrics)  # outermost: sees every status, 413s included
    return app
