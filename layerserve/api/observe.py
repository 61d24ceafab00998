"""What the server shows of itself: Prometheus metrics (`/metrics`) and one log line per request.

Names follow vLLM's where one exists, under a `layerserve:` prefix. Request-level timings are
taken where users feel them, in the HTTP layer (`Run` reports to `RequestMetrics`); engine-level
state (running/waiting requests, KV usage, prefix-cache and preemption counters) is read from
the engine at scrape time. Each app owns its registry: nothing is module-global.

The per-request log line carries ids, status, token counts and timings; prompt text only with
`--log-prompts`, output text never.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("layerserve.requests")

# Latency buckets (seconds), close to vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0)


class RequestMetrics:
    """The counters and histograms fed by request handling (one set per app)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"layerserve:{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"layerserve:{name}", doc, buckets=buckets, registry=registry)

        self.http_requests = counter("http_requests", "HTTP requests by route and status code", ("route", "status"))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of engine requests")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.request_success = counter("request_success", "Engine requests finished, by finish reason",
                                       ("finished_reason",))
        self.aborted = counter("aborted_requests", "Engine requests aborted (client gone, timeout, shutdown)")
        self.rejected = counter("rejected_requests", "Requests refused with 429 because the queue was full")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token of engine requests", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens of a request", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Engine request latency, arrival to finish", E2E_BUCKETS)


class EngineCollector:
    """Reads the engine's stats at scrape time (no state of its own)."""

    def __init__(self, state: Any) -> None:
        self.state = state  # ServerState

    def collect(self) -> Iterator[Metric]:
        state = self.state
        rt = state.runtime
        yield GaugeMetricFamily("layerserve:model_loaded", "1 once the model is loaded", value=int(rt is not None))
        yield GaugeMetricFamily("layerserve:draining", "1 while shutting down (no new requests)",
                                value=int(state.draining))
        yield GaugeMetricFamily("layerserve:num_requests_admitted", "Generation requests admitted by the HTTP layer",
                                value=state.admission.requests)
        yield GaugeMetricFamily("layerserve:num_sequences_admitted",
                                "Sequences (prompts x n) admitted by the HTTP layer", value=state.admission.sequences)
        yield GaugeMetricFamily("layerserve:num_prompt_tokens_admitted",
                                "Prompt tokens of the admitted sequences", value=state.admission.tokens)
        if rt is None:
            return
        s = rt.engine.stats()
        gauges = {
            "num_requests_running": ("Requests being generated", s.num_running),
            "num_requests_waiting": ("Requests queued in the engine", s.num_waiting),
            "kv_cache_usage_perc": ("Fraction of KV blocks held by running requests (cached blocks count as free)",
                                    s.kv_usage),
            "kv_cache_blocks_free": ("KV blocks free (including cached, evictable ones)", s.num_free_blocks),
            "kv_cache_blocks_total": ("KV blocks in the pool", s.num_blocks),
            "kv_cache_blocks_cached": ("Free KV blocks that still hold a cached prefix", s.num_cached_blocks),
            "kv_cache_memory_bytes": ("Size of the KV pool (its pages are touched as blocks are first used)",
                                      rt.info.kv_cache_bytes),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"layerserve:{name}", doc, value=value)
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache", s.prefix_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache", s.prefix_hits),
            "num_preemptions": ("Sequences preempted for lack of KV blocks", s.num_preemptions),
            "engine_steps": ("Engine steps run", s.num_steps),
            "engine_failed_batches": ("Engine steps that raised; their requests failed", s.num_failed_batches),
            "spec_decode_num_draft_tokens": ("Draft tokens computed (prompt-lookup speculative decoding)",
                                             s.spec_draft_tokens),
            "spec_decode_num_accepted_tokens": ("Draft tokens kept: the sampled token was the drafted one",
                                                s.spec_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"layerserve:{name}", doc, value=value)
        yield GaugeMetricFamily("layerserve:spec_decode_acceptance_rate", "Kept share of draft tokens (0 before any)",
                                value=s.spec_accepted_tokens / s.spec_draft_tokens if s.spec_draft_tokens else 0.0)
        yield GaugeMetricFamily("layerserve:kv_cache_blocks_held", "KV blocks sessions hold (never evicted)",
                                value=s.num_held_blocks)
        if state.sessions is not None:
            yield from state.sessions.metrics()


class Observability:
    """The app's registry, its request metrics, and the `/metrics` endpoint."""

    def __init__(self, state: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics(self.registry)
        self.registry.register(EngineCollector(state))

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class AccessLog:
    """ASGI middleware: counts every HTTP request by route and status, and logs one line per
    request with what the handler added to `request.state.log` (id, tokens, TTFT)."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500  # what the client sees if the app dies before answering
        fields: dict[str, Any] = {}
        scope.setdefault("state", {})["log"] = fields

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(path, str(status)).inc()
            if status == 429:
                self.metrics.rejected.inc()
            if path not in ("/metrics", "/health", "/v1/health") or status >= 400:
                extra = "".join(f" {k}={v}" for k, v in fields.items())
                log.info("%s %s %d %.1fms%s", scope["method"], scope["path"], status,
                         (time.monotonic() - start) * 1000, extra)


def log_fields(request: Request) -> dict[str, Any]:
    """The dict the access log prints for this request (handlers add id, tokens, TTFT)."""
    fields = getattr(request.state, "log", None)
    if fields is None:
        fields = {}
        request.state.log = fields
    return fields
