"""LayerScale's official Python client (`layerscale`) against the real server, unchanged: health,
models and chat completions (plus a messages turn without a model). Bodies are checked against the
client's own pydantic models, and the fields those models declare (and the client's docs promise)
are checked to be present, not merely allowed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import pytest
from api_helpers import assert_error
from layerscale import AsyncLayerScale, LayerScale, NotFoundError
from layerscale.types.chat import ChatCompletionChunk, ChatCompletionResponse
from layerscale.types.common import HealthBody, Model, ModelsResponse
from server_process import MAX_MODEL_LEN, Server

SERVED = "SmolLM2-135M-Instruct"
HELLO = [{"role": "user", "content": "Say hello."}]

# Counters the server reports (HealthBody declares more, each optional).
COUNTERS = ("uptime_ms", "queued", "running", "kv_pages_total", "kv_pages_free", "steps", "preemptions",
            "requests_started", "requests_ok", "requests_failed", "requests_cancelled", "prompt_tokens",
            "generated_tokens", "prefix_cached_tokens", "sessions", "session_turns", "session_cached_tokens",
            "session_ingested_tokens", "session_warm_turns", "session_warmed_tokens", "session_flash_hits",
            "session_ready_exits")


@pytest.fixture(scope="module")
def ls(server: Server) -> Iterator[LayerScale]:
    # timeout: a bound for a hung server, not a speed check (a loaded 2-core machine is slow)
    with LayerScale(server.base_url, max_retries=0, timeout=300) as client:
        yield client


def _assert_declared(obj, names) -> None:
    """Each field is present in the parsed body (sent, not defaulted by the client's model)."""
    missing = [name for name in names if name not in obj.model_fields_set]
    assert not missing, (missing, obj)


# ---- health -----------------------------------------------------------------------------------
def test_health_check(ls: LayerScale) -> None:
    ls.chat.create(messages=HELLO, max_tokens=2)  # so the token counters have something to count
    health = ls.health.check()
    assert health.ok is True and health.status == 200
    body = health.body
    assert isinstance(body, HealthBody) and body.status == "ok"
    _assert_declared(body, ("status", *COUNTERS))
    for name in COUNTERS:
        assert isinstance(getattr(body, name), int) and getattr(body, name) >= 0, name
    assert body.kv_pages_total > 0 and 0 <= body.kv_pages_free <= body.kv_pages_total
    assert body.steps > 0 and body.prompt_tokens > 0 and body.generated_tokens > 0
    assert body.requests_ok >= 1 and body.requests_started >= body.requests_ok
    assert body.model_extra["model"] == SERVED  # kept beside the client's fields


def test_healthz_and_v1_health_answer_the_same_shape(server: Server, http: httpx.Client) -> None:
    for path in ("/health", "/healthz", "/v1/health"):
        response = http.get(path)
        assert response.status_code == 200, path
        body = response.json()
        assert body["status"] == "ok" and body["error"] is None
        assert set(COUNTERS) <= set(body)
        HealthBody.model_validate(body)


async def test_async_health_check(server: Server) -> None:
    async with AsyncLayerScale(server.base_url, max_retries=0, timeout=300) as client:
        health = await client.health.check()
    assert health.ok and health.status == 200 and health.body.status == "ok"


def test_health_of_no_server_is_status_0() -> None:
    from server_process import free_port

    with LayerScale(f"http://127.0.0.1:{free_port()}", max_retries=0, timeout=5) as client:
        health = client.health.check()
    assert (health.ok, health.status, health.body) == (False, 0, None)


# ---- models -----------------------------------------------------------------------------------
MODEL_FIELDS = ("id", "object", "created", "owned_by", "max_model_len", "type", "display_name", "created_at",
                "max_input_tokens", "max_tokens", "lifecycle", "capabilities", "deprecated_at", "retires_at", "line")


def _check_model(model: Model) -> None:
    _assert_declared(model, MODEL_FIELDS)
    assert model.id == SERVED and model.object == "model" and model.type == "model"
    assert model.display_name == SERVED and model.owned_by
    assert datetime.fromisoformat(model.created_at.replace("Z", "+00:00")) == \
        datetime.fromtimestamp(model.created, timezone.utc)
    assert model.max_model_len == MAX_MODEL_LEN
    assert model.max_input_tokens == model.max_tokens == MAX_MODEL_LEN - 1
    assert model.lifecycle == "active"
    assert (model.capabilities, model.deprecated_at, model.retires_at, model.line) == (None, None, None, None)


def test_models_list(ls: LayerScale) -> None:
    listing = ls.models.list()
    assert isinstance(listing, ModelsResponse)
    _assert_declared(listing, ("object", "data", "has_more", "first_id", "last_id"))
    assert listing.object == "list" and len(listing.data) == 1 and listing.has_more is False
    assert listing.first_id == listing.last_id == SERVED
    _check_model(listing.data[0])


def test_models_retrieve_is_case_insensitive(ls: LayerScale) -> None:
    listed = ls.models.list().data[0]
    for name in (SERVED, SERVED.lower(), SERVED.upper()):
        model = ls.models.retrieve(name)
        _check_model(model)
        assert model == listed


def test_models_retrieve_unknown_is_404(ls: LayerScale, http: httpx.Client) -> None:
    with pytest.raises(NotFoundError) as caught:
        ls.models.retrieve("no-such-model")
    assert caught.value.status_code == 404
    assert_error(http.get("/v1/models/no-such-model"), 404, param="model", code="model_not_found")


async def test_async_models(server: Server) -> None:
    async with AsyncLayerScale(server.base_url, max_retries=0, timeout=300) as client:
        listing = await client.models.list()
        model = await client.models.retrieve(SERVED.lower())
    assert listing.data[0] == model
    _check_model(model)


# ---- chat completions -------------------------------------------------------------------------
def _check_response(response: ChatCompletionResponse) -> None:
    assert isinstance(response, ChatCompletionResponse)
    assert response.model == SERVED and response.object == "chat.completion"
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None and "tool_calls" not in choice.message.model_fields_set
    assert choice.message.reasoning is None and "reasoning" not in choice.message.model_fields_set  # no reasoning mode
    usage = response.usage
    assert usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    _assert_declared(usage.prompt_tokens_details, ("cached_tokens",))
    assert 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens


def test_chat_create_without_model(ls: LayerScale) -> None:
    _check_response(ls.chat.create(messages=HELLO, max_tokens=4))


def test_chat_create_with_any_model_name(ls: LayerScale) -> None:
    _check_response(ls.chat.create(model="whatever-you-like", messages=HELLO, max_tokens=4))


def test_chat_create_with_the_clients_extension_fields(ls: LayerScale) -> None:
    response = ls.chat.create(
        messages=[{"role": "system", "content": "You are brief."}, *HELLO], max_tokens=8, seed=7,
        ignore_eos=True, temperature=0.6, top_p=0.9, stop=["\n\n"],
        chat_template_kwargs={"date_string": "26 Jul 2024", "enable_thinking": False,
                              "add_generation_prompt": True},
        reasoning_effort="high", include_reasoning=False, separate_reasoning=False, stream_reasoning=False,
        parallel_tool_calls=True, tools=[{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        tool_choice="none", logprobs=True, top_logprobs=2,
    )
    choice = response.choices[0]
    assert response.model == SERVED and choice.logprobs is not None
    assert len(choice.logprobs.content) == response.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)


def test_seed_makes_sampling_repeatable(ls: LayerScale) -> None:
    def run() -> str:
        return ls.chat.create(messages=HELLO, max_tokens=6, temperature=1.0, seed=1234, ignore_eos=True) \
            .choices[0].message.content

    assert run() == run()


def test_ignore_eos_runs_to_max_tokens(ls: LayerScale) -> None:
    response = ls.chat.create(messages=HELLO, max_tokens=8, ignore_eos=True)
    assert response.usage.completion_tokens == 8 and response.choices[0].finish_reason == "length"


@pytest.mark.parametrize("effort", ["none", "minimal", "low", "medium", "high", "xhigh", "max"])
def test_every_reasoning_effort_is_accepted_and_changes_nothing(ls: LayerScale, effort: str) -> None:
    plain = ls.chat.create(messages=HELLO, max_tokens=4, temperature=0.0)
    reasoned = ls.chat.create(messages=HELLO, max_tokens=4, temperature=0.0, reasoning_effort=effort,
                              include_reasoning=True, separate_reasoning=True, stream_reasoning=True)
    assert reasoned.choices[0].message.content == plain.choices[0].message.content
    assert reasoned.usage.prompt_tokens == plain.usage.prompt_tokens


def test_unknown_reasoning_effort_is_400(http: httpx.Client) -> None:
    body = {"messages": HELLO, "max_tokens": 2, "reasoning_effort": "extreme"}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param="reasoning_effort")


def test_chat_stream_with_usage(ls: LayerScale) -> None:
    chunks: list[ChatCompletionChunk] = []
    with ls.chat.stream(messages=HELLO, max_tokens=6, seed=3, stream_options={"include_usage": True},
                        reasoning_effort="low", include_reasoning=True) as stream:
        chunks = list(stream)
    assert chunks and all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert {chunk.model for chunk in chunks} == {SERVED} and len({chunk.id for chunk in chunks}) == 1
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(chunk.usage is None and "usage" in chunk.model_fields_set for chunk in body)  # "usage": null
    _assert_declared(last.usage.prompt_tokens_details, ("cached_tokens",))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in body if chunk.choices)
    assert text and body[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.choices[0].delta.reasoning is None for chunk in body if chunk.choices)
    assert 1 <= last.usage.completion_tokens <= 6


def test_chat_stream_without_usage(ls: LayerScale) -> None:
    with ls.chat.stream(messages=HELLO, max_tokens=4) as stream:
        chunks = list(stream)
    assert chunks and all(chunk.choices for chunk in chunks)
    assert all("usage" not in chunk.model_fields_set for chunk in chunks)


async def test_async_chat(server: Server) -> None:
    async with AsyncLayerScale(server.base_url, max_retries=0, timeout=300) as client:
        _check_response(await client.chat.create(messages=HELLO, max_tokens=4, seed=5))
        stream = await client.chat.stream(messages=HELLO, max_tokens=4, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_session_id_in_the_client_travels_as_the_header(ls: LayerScale, http: httpx.Client) -> None:
    """The client moves `session_id` out of the body; the body form is refused, naming the header."""
    body = {"messages": HELLO, "max_tokens": 2, "session_id": "sess_123"}
    for path in ("/v1/chat/completions",):
        error = assert_error(http.post(path, json=body), 400, param="session_id")
        assert "x-layerscale-session-id" in error["message"]
    response = http.post("/v1/messages", json={**body, "max_tokens": 2})
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "session_id" in error["error"]["message"] and "x-layerscale-session-id" in error["error"]["message"]


def test_null_session_id_in_the_body_is_no_session(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2, "session_id": None})
    assert response.status_code == 200, response.text


# ---- Anthropic messages -----------------------------------------------------------------------
def test_messages_create_without_model(ls: LayerScale) -> None:
    from layerscale.types.messages import MessageResponse

    message = ls.messages.create(messages=HELLO, max_tokens=4, seed=2, ignore_eos=True)
    assert isinstance(message, MessageResponse)
    assert message.model == SERVED and message.role == "assistant" and message.type == "message"
    assert message.content and message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens == 4


def test_count_tokens_without_model(http: httpx.Client) -> None:
    response = http.post("/v1/messages/count_tokens", json={"messages": HELLO})
    assert response.status_code == 200, response.text
    assert response.json()["input_tokens"] > 0
