"""GET /health, /v1/health, /v1/models and /v1/models/{id} (/metrics is in observe.py)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from layerserve.api.errors import NotFoundError
from layerserve.api.state import ServerState, server_state


async def health(request: Request) -> Response:
    """200 once the model is loaded; 503 (in the error envelope) while loading, after a failed load
    and while draining for shutdown (so load balancers stop sending requests)."""
    state = server_state(request)
    state.ready()
    return JSONResponse({"status": "ok", "model": state.config.served_model_name})


def model_card(state: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {"id": state.config.served_model_name, "object": "model", "created": state.created,
                            "owned_by": "layerserve"}
    if state.runtime is not None:
        card["max_model_len"] = state.runtime.engine.max_model_len
    return card


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [model_card(server_state(request))]})


async def retrieve_model(request: Request, model_id: str) -> Response:
    state = server_state(request)
    if model_id != state.config.served_model_name:
        raise NotFoundError(f"The model '{model_id}' does not exist; this server serves "
                            f"'{state.config.served_model_name}'.", "model", "model_not_found")
    return JSONResponse(model_card(state))
