"""/health, /v1/health, /v1/models, /v1/models/{id}, /tokenize, /detokenize and /metrics."""

from __future__ import annotations

from api_helpers import metrics


def test_health(http):
    for path in ("/health", "/v1/health"):
        response = http.get(path)
        assert response.status_code == 200 and response.json()["status"] == "ok"


def test_models(http, schema):
    body = http.get("/v1/models").json()
    schema(body, "ListModelsResponse")
    assert [m["id"] for m in body["data"]] == ["SmolLM2-135M-Instruct"]
    model = http.get("/v1/models/SmolLM2-135M-Instruct").json()
    schema(model, "Model")
    assert model == body["data"][0]


def test_sdk_retrieve_model(openai_client):
    assert openai_client.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"


def test_tokenize_roundtrip(http):
    body = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == 1024
    assert body["token_strs"] is None
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "Hello world"}
    strs = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()["token_strs"]
    assert "".join(strs) == "Hello world"


def test_tokenize_messages_matches_chat_usage(http):
    messages = [{"role": "user", "content": "Count me."}]
    counted = http.post("/tokenize", json={"messages": messages}).json()["count"]
    usage = http.post("/v1/chat/completions", json={"model": "x", "messages": messages, "max_tokens": 1}).json()["usage"]
    assert counted == usage["prompt_tokens"]


def test_tokenize_errors(http):
    assert http.post("/tokenize", json={}).status_code == 400
    assert http.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}).status_code == 400
    assert http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_metrics(http):
    values = metrics(http)
    assert values["layerserve_model_loaded"] == 1
    assert values["layerserve_kv_blocks_total"] > 0
    assert "layerserve_requests_running" in values
    assert values["layerserve_engine_steps_total"] >= 0
