"""GET /health (also /healthz, /v1/health), /v1/models and /v1/models/{id} (/metrics is in observe.py).

/health answers the same body on 200 and 503 (LayerScale's `HealthBody`): `status` ("ok" or
"unavailable") and the server's counters, read from the engine and the request metrics at the
time of the call. Model entries carry OpenAI's fields and Anthropic's `ModelInfo` fields at once.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter

from layerserve.api.errors import ERROR_TABLE, APIError, NotFoundError, error_body
from layerserve.api.state import ServerState, server_state

SESSION_COUNTERS = ("sessions", "session_turns", "session_cached_tokens", "session_ingested_tokens",
                    "session_warm_turns", "session_warmed_tokens", "session_flash_hits", "session_ready_exits")


def _totals(counter: Counter) -> dict[tuple[str, ...], float]:
    """A counter's `_total` samples by label values (one entry, `()`, for an unlabelled counter)."""
    return {tuple(sample.labels.values()): sample.value
            for family in counter.collect() for sample in family.samples if sample.name.endswith("_total")}


def health_counters(state: ServerState) -> dict[str, int]:
    """The counters of the health body; engine ones are 0 until the model is loaded."""
    m = state.metrics
    finished = _totals(m.request_success)
    failed = int(sum(v for labels, v in finished.items() if labels == ("error",)))
    ok = int(sum(finished.values())) - failed
    cancelled = int(sum(_totals(m.aborted).values()))
    body: dict[str, int] = {"uptime_ms": max(0, int(time.time() * 1000) - state.created * 1000),
                            "queued": 0, "running": 0, "kv_pages_total": 0, "kv_pages_free": 0, "steps": 0,
                            "preemptions": 0}
    if state.runtime is not None:
        s = state.runtime.engine.stats()
        body.update(queued=s.num_waiting, running=s.num_running, kv_pages_total=s.num_blocks,
                    kv_pages_free=s.num_free_blocks, steps=s.num_steps, preemptions=s.num_preemptions)
        prefix_cached = s.prefix_hits
    else:
        prefix_cached = 0
    body.update(
        requests_started=ok + failed + cancelled + body["running"] + body["queued"],
        requests_ok=ok, requests_failed=failed, requests_cancelled=cancelled,
        prompt_tokens=int(sum(_totals(m.prompt_tokens).values())),
        generated_tokens=int(sum(_totals(m.generation_tokens).values())),
        prefix_cached_tokens=prefix_cached,
    )
    sessions = getattr(state, "session_counters", None)
    reported = sessions() if callable(sessions) else {}
    for name in SESSION_COUNTERS:
        body[name] = int(reported.get(name, 0))
    for name, value in reported.items():  # any further session counters the state keeps
        body.setdefault(name, int(value))
    return body


async def health(request: Request) -> Response:
    """200 once the model is loaded; 503 while loading, after a failed load, once the engine has
    stopped and while draining for shutdown (so load balancers stop sending requests). The body is
    the same either way; on 503 `error` says why (OpenAI's error object), on 200 it is null."""
    state = server_state(request)
    try:
        state.ready()
    except APIError as exc:
        kind = next(ERROR_TABLE[cls] for cls in type(exc).__mro__ if cls in ERROR_TABLE)
        body = {"status": "unavailable", "model": state.config.served_model_name, **health_counters(state),
                **error_body(exc.message, kind, exc.param, exc.code)}
        return JSONResponse(body, status_code=kind.status)
    body = {"status": "ok", "model": state.config.served_model_name, **health_counters(state), "error": None}
    return JSONResponse(body)


def model_card(state: ServerState) -> dict[str, Any]:
    name = state.config.served_model_name
    created_at = datetime.fromtimestamp(state.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    card: dict[str, Any] = {"id": name, "object": "model", "created": state.created, "owned_by": "layerserve",
                            "type": "model", "display_name": name, "created_at": created_at}
    if state.runtime is not None:
        max_model_len = state.runtime.engine.max_model_len
        card.update(max_model_len=max_model_len, max_input_tokens=max_model_len - 1, max_tokens=max_model_len - 1)
    card.update(lifecycle="active", capabilities=None, deprecated_at=None, retires_at=None, line=None)
    return card


async def list_models(request: Request) -> Response:
    card = model_card(server_state(request))
    return JSONResponse({"object": "list", "data": [card], "has_more": False, "first_id": card["id"],
                         "last_id": card["id"]})


async def retrieve_model(request: Request, model_id: str) -> Response:
    state = server_state(request)
    if model_id.casefold() != state.config.served_model_name.casefold():
        raise NotFoundError(f"The model '{model_id}' does not exist; this server serves "
                            f"'{state.config.served_model_name}'.", "model", "model_not_found")
    return JSONResponse(model_card(state))
