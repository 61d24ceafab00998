"""GET /health, /v1/health, /v1/models, /v1/models/{id} and /metrics (Prometheus text)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from layerserve.api.errors import NotFoundError
from layerserve.api.state import ServerState, server_state


async def health(request: Request) -> Response:
    """200 once the model is loaded; 503 (in the error envelope) while loading or after a failed load."""
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


class EngineCollector:
    """Reads the engine's stats at scrape time (no state of its own)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        rt = self.state.runtime
        yield GaugeMetricFamily("layerserve_model_loaded", "1 once the model is loaded", value=int(rt is not None))
        if rt is None:
            return
        s = rt.engine.stats()
        gauges = {
            "requests_running": ("Requests being generated", s.num_running),
            "requests_waiting": ("Requests queued for the engine", s.num_waiting),
            "kv_cache_usage": ("Fraction of KV blocks held by running requests", s.kv_usage),
            "kv_blocks_free": ("Free KV blocks", s.num_free_blocks),
            "kv_blocks_total": ("KV blocks in the pool", s.num_blocks),
            "kv_blocks_cached": ("KV blocks kept in the prefix cache", s.num_cached_blocks),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"layerserve_{name}", doc, value=value)
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache", s.prefix_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache", s.prefix_hits),
            "preemptions": ("Sequences preempted for lack of KV blocks", s.num_preemptions),
            "engine_steps": ("Engine steps run", s.num_steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"layerserve_{name}", doc, value=value)


def metrics_endpoint(state: ServerState):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(state))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
