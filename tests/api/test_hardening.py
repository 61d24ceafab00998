"""Production hardening: backpressure (429), timeouts, graceful shutdown on SIGTERM, engine faults.

The shutdown and queue tests start their own server (SIGTERM ends it); the fault test runs the
app in-process with the real model and a runner that fails on purpose for marked requests (the
only way to make a real forward pass raise on demand)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
from api_helpers import assert_error, chat_body, metrics, read_sse
from server_process import start_server

from layerserve.api.app import build_app
from layerserve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig

LONG = {"max_tokens": 900, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def narrow_server(tmp_path_factory):
    """One running slot and one waiting slot: the third concurrent request is refused."""
    proc, srv = start_server(tmp_path_factory.mktemp("narrow") / "server.log", "--max-num-seqs", "1",
                             "--max-queued-requests", "1", "--shutdown-timeout", "60")
    yield proc, srv
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def first_chunk(response: httpx.Response):
    """Read until the first SSE event has arrived; returns the line iterator, which must be kept
    (httpx closes the response when it is dropped)."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            return lines
    raise AssertionError("stream ended before any event")


def test_queue_bound_gives_429_with_retry_after(narrow_server):
    _, srv = narrow_server
    with httpx.Client(base_url=srv.base_url, timeout=120) as http:
        body = chat_body("Count to one thousand.", stream=True, **LONG)
        with http.stream("POST", "/v1/chat/completions", json=body) as running, \
                http.stream("POST", "/v1/chat/completions", json=body) as waiting:
            kept = [first_chunk(running), first_chunk(waiting)]  # the role chunk comes at once, even while queued
            refused = http.post("/v1/chat/completions", json=chat_body())
            error = assert_error(refused, 429, code="queue_full")
            assert error["type"] == "rate_limit_error" and "--max-queued-requests" in error["message"]
            assert int(refused.headers["retry-after"]) >= 1
            assert_error(http.post("/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 2}), 429)
            assert http.get("/health").status_code == 200  # refusing work is not being unhealthy
            del kept
        # both streams closed by the client: their places are free again
        deadline = time.monotonic() + 30
        while metrics(http)["layerserve:num_requests_admitted"] > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200
        values = metrics(http)
        assert values["layerserve:rejected_requests_total"] == 2
        assert values['layerserve:http_requests_total{route="/v1/chat/completions",status="429"}'] == 1


def test_sigterm_drains_a_running_stream(narrow_server):
    """SIGTERM mid-stream: the stream still runs to its end, then the process exits 0."""
    proc, srv = narrow_server
    body = chat_body("Write a poem about the sea.", stream=True, max_tokens=40, temperature=0, ignore_eos=True)
    with httpx.Client(base_url=srv.base_url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = first_chunk(response)
            proc.send_signal(signal.SIGTERM)
            rest = [line[len("data: "):] for line in lines if line]
        assert rest[-1] == "[DONE]"
        events = [json.loads(e) for e in rest[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in events if c["choices"][0]["finish_reason"]] == ["length"]
        assert sum(1 for c in events if c["choices"][0]["delta"].get("content")) >= 30
    assert proc.wait(timeout=60) == 0


def test_client_timeout_header_stops_the_request(http):
    """The OpenAI SDKs send their timeout in X-Stainless-Timeout: past it nobody waits for the answer,
    so the server answers 408 and aborts the engine request instead of generating its 900 tokens.
    Checked by what the server counted (an abort, no finished request, fewer tokens than asked),
    not by a clock."""
    aborted, finished, generated = ("layerserve:aborted_requests_total", "layerserve:request_success_total",
                                    "layerserve:generation_tokens_total")

    def counts() -> tuple[float, float, float]:
        values = metrics(http)
        done = sum(v for k, v in values.items() if k.startswith(finished + "{"))
        return values.get(aborted, 0.0), done, values.get(generated, 0.0)

    before = counts()
    response = http.post("/v1/chat/completions", json=chat_body("Count to one thousand.", **LONG),
                         headers={"X-Stainless-Timeout": "1"})
    assert_error(response, 408, code="request_timeout")
    after = counts()
    assert after[0] == before[0] + 1  # the engine request was aborted before the 408 went out...
    assert after[1] == before[1]  # ...and never ran to its end
    assert after[2] - before[2] < LONG["max_tokens"]
    with http.stream("POST", "/v1/chat/completions", json=chat_body("Count to one thousand.", stream=True, **LONG),
                     headers={"X-Stainless-Timeout": "1"}) as stream:
        assert stream.status_code == 200
        chunks_text = read_sse(stream)
    assert chunks_text[-1] == "[DONE]"
    error = json.loads(chunks_text[-2])
    assert error["error"]["code"] == "request_timeout"
    streamed = counts()
    assert streamed[0] == after[0] + 1 and streamed[1] == after[1]  # the stream's request was aborted too
    assert streamed[2] - after[2] < LONG["max_tokens"]
    deadline = time.monotonic() + 30
    while metrics(http)["layerserve:num_requests_running"] > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metrics(http)["layerserve:kv_cache_usage_perc"] == 0.0  # the timed-out requests were aborted


# ---- engine faults (in-process, the real model) -----------------------------------------------
POISON = 13  # requests with this max_tokens make the runner raise


def faulty_loader(config: EngineConfig):
    from layerserve.engine.builder import build_engine

    core, info = build_engine(config, progress=False)
    execute = core.runner.execute

    def execute_or_fail(out):
        if any(item.seq.params.max_tokens == POISON for item in out.scheduled):
            raise RuntimeError("injected fault")
        return execute(out)

    core.runner.execute = execute_or_fail
    return core, info


@pytest.fixture
async def faulty_app():
    engine = EngineConfig(model="default", cache=CacheConfig(kv_cache_memory=64 << 20),
                          scheduler=SchedulerConfig(max_num_seqs=1, max_model_len=1024))
    app = build_app(engine, ServerConfig(), loader=faulty_loader)
    state = app.state.server
    await state.load(faulty_loader)
    assert state.runtime is not None, state.load_error
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as client:
        yield client
    await state.close()


async def test_engine_fault_fails_only_its_batch(faulty_app):
    client = faulty_app
    # max_num_seqs=1: the healthy request waits while the poisoned one runs alone, then goes on.
    poisoned = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body(max_tokens=POISON)))
    await asyncio.sleep(0.05)
    healthy = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body(max_tokens=8, temperature=0)))
    error = assert_error(await poisoned, 500, code="engine_error")
    # the cause stays in the server log: the client gets the request id to quote, not exception text
    assert "injected fault" not in error["message"] and "RuntimeError" not in error["message"]
    assert "request id chatcmpl-" in error["message"]
    ok = await healthy
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    # a stream in the failing batch gets an error event, then [DONE]
    async with client.stream("POST", "/v1/chat/completions",
                             json=chat_body(max_tokens=POISON, stream=True)) as response:
        assert response.status_code == 200
        body = (await response.aread()).decode()
    events = [e[len("data: "):] for e in body[:-2].split("\n\n")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error"
    # the server keeps serving, every block came back, and the faults were counted
    assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=4))).status_code == 200
    text = (await client.get("/metrics")).text
    assert "layerserve:engine_failed_batches_total 2.0" in text
    assert "layerserve:kv_cache_usage_perc 0.0" in text


# ---- loading: on the engine's own thread; a failed load is a 503 that says why -------------------
async def test_model_is_built_on_the_thread_that_runs_it():
    """One thread loads and runs the model: a second thread doing torch work would leave libgomp
    two worker teams on the cores, which throttles their spin-wait (15-20% slower steps)."""
    import threading

    threads: dict[str, int] = {}

    def recording_loader(config: EngineConfig):
        from layerserve.engine.builder import build_engine

        threads["build"] = threading.get_ident()
        core, info = build_engine(config, progress=False)
        execute = core.runner.execute

        def recording_execute(out):
            threads["execute"] = threading.get_ident()
            return execute(out)

        core.runner.execute = recording_execute
        return core, info

    engine = EngineConfig(model="default", cache=CacheConfig(kv_cache_memory=64 << 20),
                          scheduler=SchedulerConfig(max_model_len=1024))
    app = build_app(engine, ServerConfig(), loader=recording_loader)
    state = app.state.server
    await state.load(recording_loader)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))).status_code == 200
    finally:
        await state.close()
    assert threads["execute"] == threads["build"] != threading.get_ident()


async def test_failed_load_is_a_503_that_says_why():
    def broken_loader(config: EngineConfig):
        raise FileNotFoundError("no weights at /nowhere")

    app = build_app(EngineConfig(model="default"), ServerConfig(), loader=broken_loader)
    state = app.state.server
    await state.load(broken_loader)
    assert state.runtime is None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 503
        error = assert_error(await client.post("/v1/chat/completions", json=chat_body()), 503)
    assert "failed to load" in error["message"] and "/nowhere" not in error["message"]  # details: in the log
