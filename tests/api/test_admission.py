"""Admission counts sequences and prompt tokens, not HTTP requests; request limits name themselves."""

from __future__ import annotations

import httpx
import pytest
from api_helpers import assert_error, chat_body

from layerserve.api.admission import Admission
from layerserve.api.app import build_app
from layerserve.api.errors import InvalidRequestError, TooManyRequestsError
from layerserve.cli import is_loopback
from layerserve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig


def test_sequences_and_tokens_are_bounded_not_requests():
    admission = Admission(running_capacity=4, max_queued=4, max_tokens=1000)
    a = admission.admit(6, 300)  # one request, 6 sequences
    with pytest.raises(TooManyRequestsError):
        admission.admit(3, 30)  # 9 > 8 sequences
    b = admission.admit(2, 30)
    assert (admission.sequences, admission.tokens, admission.requests) == (8, 330, 2)
    a.release()
    a.release()  # idempotent
    with pytest.raises(TooManyRequestsError):
        admission.admit(1, 700)  # tokens: 30 + 700 fits, but...
        admission.admit(1, 300)  # ...730 + 300 does not
    b.release()
    with pytest.raises(InvalidRequestError):
        admission.admit(9, 10)  # larger than the whole bound: never admissible, a 400 not a 429
    with pytest.raises(InvalidRequestError):
        admission.admit(1, 1001)


@pytest.fixture
async def small_app():
    engine = EngineConfig(model="default", cache=CacheConfig(kv_cache_memory=64 << 20),
                          scheduler=SchedulerConfig(max_num_seqs=2, max_model_len=1024))
    app = build_app(engine, ServerConfig(max_queued_requests=2, max_queued_tokens=2048))
    state = app.state.server
    from layerserve.engine.builder import build_engine

    await state.load(lambda config: build_engine(config, progress=False))
    assert state.runtime is not None, state.load_error
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as client:
        yield client, state
    await state.close()


async def test_one_request_cannot_exceed_the_queue_bound(small_app):
    client, state = small_app
    body = {"model": "x", "prompt": ["one", "two", "three"], "n": 2, "max_tokens": 2}  # 6 sequences > 2 + 2
    error = assert_error(await client.post("/v1/completions", json=body), 400, code="request_too_large")
    assert "6 sequences" in error["message"] and "--max-queued-requests" in error["message"]
    ticket = state.admission.admit(3, 10)  # three sequences of other requests are in flight
    try:
        response = await client.post("/v1/completions", json={**body, "prompt": ["one", "two"], "n": 1})
        error = assert_error(response, 429, code="queue_full")
        assert int(response.headers["retry-after"]) >= 1
        assert_error(await client.post("/v1/chat/completions", json=chat_body(n=2, max_tokens=2)), 429)
        assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))).status_code == 200
    finally:
        ticket.release()
    ok = await client.post("/v1/completions", json={**body, "prompt": ["one", "two"], "n": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
    assert (state.admission.sequences, state.admission.tokens) == (0, 0)  # every place came back


async def test_prompt_tokens_are_bounded(small_app):
    client, _ = small_app
    long_prompt = "word " * 800  # ~800 tokens: 3 of them are 3 sequences (fine) but > 2,048 tokens
    error = assert_error(await client.post("/v1/completions", json={"model": "x", "prompt": [long_prompt] * 3,
                                                                    "max_tokens": 1}), 400)
    assert "--max-queued-tokens" in error["message"]


async def test_stop_strings_are_bounded_with_a_400_that_names_the_limit(small_app):
    client, _ = small_app
    for stop in ("x" * 1025, ["ok", "y" * 1025]):
        error = assert_error(await client.post("/v1/chat/completions", json=chat_body(stop=stop)), 400)
        assert "1024" in error["message"] and "stop" in (error["param"] or "")
    error = assert_error(await client.post("/v1/chat/completions", json=chat_body(stop=["a", "b", "c", "d", "e"])),
                         400)
    assert "4" in error["message"]
    assert (await client.post("/v1/chat/completions", json=chat_body(stop=["z" * 1024], max_tokens=2))).status_code == 200


async def test_a_dead_engine_turns_health_to_503(small_app):
    client, state = small_app
    assert (await client.get("/health")).status_code == 200
    state.runtime.engine.dead_reason = "RuntimeError: injected"
    assert (await client.get("/health")).status_code == 503
    error = assert_error(await client.post("/v1/chat/completions", json=chat_body()), 503)
    assert "injected" not in error["message"]
    state.runtime.engine.dead_reason = None


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True),
                                           ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                           ("::", False), ("192.168.1.4", False), ("myhost", False)])
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_default_host_is_loopback():
    assert ServerConfig().host == "127.0.0.1"
    with open("Makefile") as makefile:
        text = makefile.read()
    assert "HOST ?= 127.0.0.1" in text and "--host $(HOST)" in text
