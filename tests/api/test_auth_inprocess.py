"""Auth, body limit and loading states on an in-process app (httpx ASGI transport, no model):
the lifespan never runs, so routes that need the model answer 503 after auth has passed."""

from __future__ import annotations

import httpx
import pytest

from api_helpers import assert_error, chat_body
from layerserve.api.app import build_app
from layerserve.config import EngineConfig, ServerConfig

KEY = "sk-test-123"


def client_for(server_config: ServerConfig) -> httpx.AsyncClient:
    app = build_app(EngineConfig(model="default"), server_config)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def keyed() -> httpx.AsyncClient:
    async with client_for(ServerConfig(api_key=KEY)) as client:
        yield client


async def test_missing_key_401(keyed):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                         ("GET", "/v1/models/SmolLM2-135M-Instruct"), ("POST", "/tokenize")):
        error = assert_error(await keyed.request(method, path, json={}), 401, code="invalid_api_key")
        assert "API key" in error["message"]


async def test_wrong_key_401(keyed):
    for headers in ({"Authorization": "Bearer nope"}, {"x-api-key": "nope"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"}):
        assert_error(await keyed.get("/v1/models", headers=headers), 401, code="invalid_api_key")


async def test_right_key_passes(keyed):
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"}, {"x-api-key": KEY}):
        response = await keyed.get("/v1/models", headers=headers)
        assert response.status_code == 200, response.text
        # past auth, a route that needs the model says it is loading
        assert_error(await keyed.post("/v1/chat/completions", json=chat_body(), headers=headers), 503,
                     code="model_not_ready")


async def test_open_routes_need_no_key(keyed):
    for path in ("/health", "/v1/health", "/healthz"):
        response = await keyed.get(path)  # loading, not 401
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_ready"
    response = await keyed.get("/metrics")
    assert response.status_code == 200
    assert "layerserve:model_loaded 0.0" in response.text


async def test_without_configured_key_any_key_works():
    async with client_for(ServerConfig()) as client:
        for headers in ({}, {"Authorization": "Bearer your-api-key"}, {"x-api-key": "anything"}):
            assert (await client.get("/v1/models", headers=headers)).status_code == 200


async def test_default_body_limit_is_16_mib():
    async with client_for(ServerConfig()) as client:
        under = await client.post("/v1/chat/completions", content=b"x" * (16 << 20),
                                  headers={"content-type": "application/json"})
        assert under.status_code == 503  # read in full, then: model not loaded
        over = await client.post("/v1/chat/completions", content=b"x" * ((16 << 20) + 1),
                                 headers={"content-type": "application/json"})
        assert_error(over, 413, code="request_too_large")


async def test_failed_load_is_reported():
    app = build_app(EngineConfig(model="default"), ServerConfig())

    def broken_loader(config):
        raise FileNotFoundError("no such model: /nowhere.gguf")

    await app.state.server.load(broken_loader)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"  # LayerScale's HealthBody
        error = health.json()["error"]
        assert error["code"] == "model_not_ready"
        assert "failed to load" in error["message"] and "/nowhere.gguf" not in error["message"]  # details: the log
