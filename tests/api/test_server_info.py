"""/health, /v1/health, /v1/models, /v1/models/{id}, /tokenize, /detokenize and /metrics."""

from __future__ import annotations

from api_helpers import chat_body, metrics


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
    """vLLM-style names under `layerserve:`; a request moves the counters and histograms it should."""
    before = metrics(http)
    assert before["layerserve:model_loaded"] == 1
    assert before["layerserve:kv_cache_blocks_total"] > 0
    assert before["layerserve:kv_cache_memory_bytes"] > 0
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "aborted_requests_total",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count"):
        assert f"layerserve:{name}" in before, name
    response = http.post("/v1/chat/completions", json=chat_body(max_tokens=5, temperature=0, ignore_eos=True))
    assert response.status_code == 200
    usage = response.json()["usage"]
    after = metrics(http)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("layerserve:prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("layerserve:generation_tokens_total") == usage["completion_tokens"] == 5
    assert grew("layerserve:time_to_first_token_seconds_count") == 1
    assert grew("layerserve:inter_token_latency_seconds_count") == 4
    assert grew("layerserve:e2e_request_latency_seconds_count") == 1
    assert grew("layerserve:prefix_cache_queries_total") >= usage["prompt_tokens"] - 1
    key = 'layerserve:request_success_total{finished_reason="length"}'
    assert after[key] - before.get(key, 0.0) == 1
    assert after["layerserve:kv_cache_usage_perc"] == 0.0  # nothing running: cached blocks count as free
    ok = 'layerserve:http_requests_total{route="/v1/chat/completions",status="200"}'
    assert after[ok] - before.get(ok, 0.0) == 1
