"""Anthropic's error envelope on /v1/messages, on an in-process app (no model: the lifespan never
runs), driven by the real `anthropic` SDK over an ASGI transport; and the envelope's mapping of
the error table (529 for a full queue) and the in-band stream error, as units."""

from __future__ import annotations

import json

import anthropic
import httpx2  # the SDK's HTTP client (httpx objects are refused)
import pytest

import anthropic_types as types
from layerserve.api.anthropic_surface import anthropic_envelope, anthropic_error_event
from layerserve.api.app import build_app
from layerserve.api.errors import ERROR_TABLE, EngineRequestError, RequestTimeoutError, TooManyRequestsError, explain
from layerserve.config import EngineConfig, ServerConfig

KEY = "sk-ant-test-123"
HELLO = [{"role": "user", "content": "Say hello."}]


def sdk_for(api_key: str, **config) -> anthropic.AsyncAnthropic:
    app = build_app(EngineConfig(model="default"), ServerConfig(api_key=KEY, **config))
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    return anthropic.AsyncAnthropic(base_url="http://test", api_key=api_key, http_client=http, max_retries=0)


def assert_envelope(err: anthropic.APIStatusError, status: int, error_type: str) -> str:
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type and body["error"]["message"]
    if error_type != "request_too_large":  # Anthropic documents this type; the SDK's union lacks it
        types.error_response(body)
    assert err.response.headers["request-id"].startswith("req_")
    return body["error"]["message"]


@pytest.mark.parametrize("key", ["wrong", f"{KEY}x"])
async def test_wrong_api_key(key):
    async with sdk_for(key) as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(model="m", max_tokens=4, messages=HELLO)
        assert_envelope(info.value, 401, "authentication_error")
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.count_tokens(model="m", messages=HELLO)


async def test_right_key_passes_auth_then_the_model_is_loading():
    async with sdk_for(KEY) as client:  # the SDK sends it as x-api-key, with anthropic-version
        with pytest.raises(anthropic.InternalServerError) as info:
            await client.messages.create(model="m", max_tokens=4, messages=HELLO)
        assert "loading" in assert_envelope(info.value, 503, "overloaded_error")


async def test_body_too_large():
    async with sdk_for(KEY, max_body_bytes=1000) as client:
        with pytest.raises(anthropic.RequestTooLargeError) as info:
            await client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "x" * 2000}])
        assert_envelope(info.value, 413, "request_too_large")


async def test_unknown_route():
    async with sdk_for(KEY) as client:
        with pytest.raises(anthropic.NotFoundError) as info:
            await client.post("/v1/messages/nope", body={}, cast_to=httpx2.Response)
        assert_envelope(info.value, 404, "not_found_error")


def test_envelope_maps_the_error_table():
    cases = [
        (TooManyRequestsError("The server is at capacity.", retry_after=1), 529, "overloaded_error"),
        (EngineRequestError("boom"), 500, "api_error"),
        (RequestTimeoutError("too slow"), 408, "timeout_error"),
    ]
    for exc, status, error_type in cases:
        kind, message, param, code = explain(exc)
        got_status, body = anthropic_envelope(kind, message, param, code)
        assert (got_status, body["error"]["type"]) == (status, error_type)
        types.error_response(body)
    assert ERROR_TABLE[TooManyRequestsError].status == 429  # the OpenAI routes keep theirs


def test_in_band_stream_error():
    frame = anthropic_error_event(EngineRequestError("The server had an error while generating this response."))
    name, data = frame.removesuffix("\n\n").split("\n")
    assert name == "event: error" and data.startswith("data: ")
    body = types.error_response(json.loads(data[len("data: "):]))
    assert body.error.type == "api_error"
