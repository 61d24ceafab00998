"""Anthropic's Messages API end to end: the real server with the default model, driven by the
official `anthropic` Python SDK (base_url without /v1, as a user points it at api.anthropic.com).
Every JSON body and every stream event is checked against the SDK's own types, extra fields
forbidden (anthropic_types.py)."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

import anthropic_types as types

MODEL = "any-model-name"  # any name is served by the one loaded model
GREEDY = {"temperature": 0.0}  # SDK 1.x dropped the sampling arguments from create(); they go in the body
HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER = {
    "name": "get_weather",
    "description": "Get current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"],
    },
}
STOCK = {
    "name": "get_stock_price",
    "description": "Get the latest price of a stock",
    "input_schema": {"type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]},
}


def create(client: anthropic.Anthropic, **fields) -> anthropic.types.Message:
    """`messages.create` at temperature 0, the raw JSON validated strictly; the SDK's parse returned."""
    fields.setdefault("model", MODEL)
    fields.setdefault("max_tokens", 16)
    fields.setdefault("messages", HELLO)
    fields.setdefault("extra_body", GREEDY)
    raw = client.messages.with_raw_response.create(**fields)
    assert raw.headers["request-id"].startswith("req_")
    types.message(raw.http_response.json())
    return raw.parse()


def raw_events(http: httpx.Client, body: dict) -> list[dict]:
    """The events of a streamed request, checking Anthropic's framing (`event:` then `data:`,
    the names agreeing) and each event against the SDK's types."""
    with http.stream("POST", "/v1/messages", json={"model": MODEL, "temperature": 0.0, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["request-id"].startswith("req_")
        text = r.read().decode()
    assert text.endswith("\n\n")
    events = []
    for frame in text[:-2].split("\n\n"):
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), frame
        event = json.loads(data_line[len("data: "):])
        assert event["type"] == name_line[len("event: "):]
        types.stream_event(event)
        events.append(event)
    return events


def assert_event_order(events: list[dict]) -> None:
    """message_start, blocks (start, deltas, stop; indexes 0, 1, ...), message_delta, message_stop."""
    names = [e["type"] for e in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    assert "ping" not in names and "error" not in names
    expected_index, open_index = 0, None
    for e in events[1:-2]:
        if e["type"] == "content_block_start":
            assert open_index is None and e["index"] == expected_index
            open_index = e["index"]
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_index
        else:
            assert e["type"] == "content_block_stop" and e["index"] == open_index
            open_index, expected_index = None, expected_index + 1
    assert open_index is None


def test_create(anthropic_client):
    message = create(anthropic_client, system="You are a friendly assistant.")
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL
    assert [block.type for block in message.content] == ["text"] and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    usage = message.usage
    assert usage.output_tokens >= 1 and usage.cache_creation_input_tokens == 0
    assert usage.input_tokens + usage.cache_read_input_tokens > 10


def test_max_tokens_stop_reason(anthropic_client):
    message = create(anthropic_client, max_tokens=3)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_stop_sequences(anthropic_client):
    first = create(anthropic_client, max_tokens=16).content[0].text
    word = first.split()[1].strip(",.!")  # the reply's second word: greedy, so it comes again
    message = create(anthropic_client, max_tokens=16, stop_sequences=["zzz-never", word])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == word
    assert word not in message.content[0].text and first.startswith(message.content[0].text)


def test_stream_with_the_sdk(anthropic_client):
    expected = create(anthropic_client, max_tokens=12)
    with anthropic_client.messages.stream(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=HELLO) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == final.content[0].text == expected.content[0].text
    assert final.stop_reason == expected.stop_reason and final.usage.output_tokens == expected.usage.output_tokens
    assert final.id.startswith("msg_")


def test_stream_events_follow_anthropic(http):
    events = raw_events(http, {"max_tokens": 8, "messages": HELLO, "stop_sequences": ["zzz-never"]})
    assert_event_order(events)
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text and events[1]["content_block"] == {"type": "text", "text": ""}
    delta = events[-2]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 8


def test_streamed_tool_use(http, anthropic_client):
    body = {"max_tokens": 48, "messages": [{"role": "user", "content": "What's the weather in Tokyo?"}],
            "tools": [WEATHER], "tool_choice": {"type": "any"}}
    events = raw_events(http, body)
    assert_event_order(events)
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert starts[-1]["type"] == "tool_use" and starts[-1]["id"].startswith("toolu_") and starts[-1]["input"] == {}
    last = starts.index(starts[-1])
    partial = "".join(e["delta"]["partial_json"] for e in events
                      if e["type"] == "content_block_delta" and e["index"] == last)
    jsonschema.validate(json.loads(partial), WEATHER["input_schema"])
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    with anthropic_client.messages.stream(model=MODEL, extra_body=GREEDY, **body) as stream:
        final = stream.get_final_message()
    assert final.content[-1].type == "tool_use" and final.content[-1].input == json.loads(partial)


def assert_valid_call(block, tool: dict) -> None:
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name == tool["name"]
    assert isinstance(block.input, dict)
    jsonschema.validate(block.input, tool["input_schema"])


def assert_tool_use(message: anthropic.types.Message, tool: dict) -> anthropic.types.ToolUseBlock:
    assert message.stop_reason == "tool_use", message
    assert_valid_call(message.content[-1], tool)
    return message.content[-1]


def test_tool_round_trip(anthropic_client):
    """tool_use -> tool_result -> a text answer."""
    messages = [{"role": "user", "content": "What's the weather in Tokyo?"}]
    first = create(anthropic_client, messages=messages, tools=[WEATHER], tool_choice={"type": "any"}, max_tokens=48)
    call = assert_tool_use(first, WEATHER)
    messages += [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": [{"type": "text", "text": "Sunny, 22 degrees celsius."}]}]},
    ]
    answer = create(anthropic_client, messages=messages, tools=[WEATHER], max_tokens=24)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text.strip()


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_stock_price"},
                                    {"type": "any", "disable_parallel_tool_use": True}])
def test_forced_tools(anthropic_client, choice):
    message = create(anthropic_client, messages=[{"role": "user", "content": "How is Apple stock doing?"}],
                     tools=[WEATHER, STOCK], tool_choice=choice, max_tokens=48)
    if choice["type"] == "tool":
        assert_tool_use(message, STOCK)
    else:
        calls = [b for b in message.content if b.type == "tool_use"]
        assert calls and message.stop_reason == "tool_use"
        for call in calls:
            assert_valid_call(call, WEATHER if call.name == "get_weather" else STOCK)
        if choice.get("disable_parallel_tool_use"):
            assert len(calls) == 1


def test_tool_choice_none_answers_in_text(anthropic_client):
    message = create(anthropic_client, messages=[{"role": "user", "content": "What's the weather in Tokyo?"}],
                     tools=[WEATHER], tool_choice={"type": "none"}, max_tokens=12)
    assert [b.type for b in message.content] == ["text"] and message.stop_reason in ("end_turn", "max_tokens")


def test_count_tokens_is_the_billed_prompt(anthropic_client, http):
    fields = {"model": MODEL, "system": [{"type": "text", "text": "Answer briefly."}],
              "messages": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]}
    counted = anthropic_client.messages.count_tokens(**fields)
    types.tokens_count(http.post("/v1/messages/count_tokens", json=fields).json())
    usage = create(anthropic_client, max_tokens=4, **fields).usage
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens > 5


def test_multi_turn_reads_the_cache(anthropic_client):
    messages = [{"role": "user", "content": "Tell me about the moon in one sentence, please, in plain words."}]
    first = create(anthropic_client, messages=messages, max_tokens=16)
    messages += [{"role": "assistant", "content": first.content[0].text},
                 {"role": "user", "content": "And the sun?"}]
    second = create(anthropic_client, messages=messages, max_tokens=8)
    assert second.usage.cache_read_input_tokens > 0
    total = second.usage.input_tokens + second.usage.cache_read_input_tokens
    assert total == anthropic_client.messages.count_tokens(model=MODEL, messages=messages).input_tokens


# ---- errors -----------------------------------------------------------------------------------
def assert_sdk_error(exc_info, cls: type, status: int, error_type: str) -> str:
    err = exc_info.value
    assert type(err) is cls and err.status_code == status
    body = types.error_response(err.response.json())
    assert body.error.type == error_type and body.error.message
    assert err.response.headers["request-id"].startswith("req_")
    return body.error.message


def test_missing_max_tokens(anthropic_client):
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client.messages.create(model=MODEL, messages=HELLO, max_tokens=anthropic.omit)
    assert "max_tokens" in assert_sdk_error(info, anthropic.BadRequestError, 400, "invalid_request_error")


def test_unknown_field_is_named(anthropic_client):
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client.messages.create(model=MODEL, messages=HELLO, max_tokens=4, extra_body={"frobnicate": 1})
    assert "frobnicate" in assert_sdk_error(info, anthropic.BadRequestError, 400, "invalid_request_error")


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "hi"}],
    [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}],
    [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_unknown", "content": "x"}]}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hel"}],  # prefill
])
def test_bad_messages(anthropic_client, messages):
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client.messages.create(model=MODEL, messages=messages, max_tokens=4)
    assert "messages" in assert_sdk_error(info, anthropic.BadRequestError, 400, "invalid_request_error")


def test_thinking(anthropic_client):
    create(anthropic_client, max_tokens=2, thinking={"type": "disabled"})
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client.messages.create(model=MODEL, messages=HELLO, max_tokens=2048,
                                         thinking={"type": "enabled", "budget_tokens": 1024})
    assert "thinking" in assert_sdk_error(info, anthropic.BadRequestError, 400, "invalid_request_error")


def test_unknown_route_is_not_found(http):
    response = http.post("/v1/messages/batches", json={})
    assert response.status_code == 404
    assert types.error_response(response.json()).error.type == "not_found_error"


def test_openai_routes_keep_their_envelope(http):
    response = http.post("/v1/chat/completions", json={"model": "x", "messages": HELLO, "frobnicate": 1})
    assert response.status_code == 400 and set(response.json()) == {"error"}
    assert "request-id" not in response.headers


def test_sdk_fields_this_server_does_not_implement_are_named(anthropic_client):
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client.messages.create(model=MODEL, messages=HELLO, max_tokens=4, inference_geo="us")
    assert "inference_geo" in assert_sdk_error(info, anthropic.BadRequestError, 400, "invalid_request_error")
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client.messages.create(model=MODEL, messages=HELLO, max_tokens=4, output_config={"effort": "low"})
    assert "effort" in assert_sdk_error(info, anthropic.BadRequestError, 400, "invalid_request_error")


def test_structured_output(anthropic_client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"],
              "additionalProperties": False}
    message = create(anthropic_client, messages=[{"role": "user", "content": "Name a colour, as JSON."}],
                     output_config={"format": {"type": "json_schema", "schema": schema}}, max_tokens=40,
                     metadata={"user_id": "u-1"}, cache_control={"type": "ephemeral"},
                     extra_body={"temperature": 0.0, "top_p": 0.9, "top_k": 20, "seed": 7})
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(message.content[0].text), schema)


def test_readme_example(server):
    """README's "Anthropic Messages API" example, but for base_url and max_tokens (cut to 16)."""
    client = anthropic.Anthropic(base_url=server.base_url, api_key="your-api-key")
    message = client.messages.create(
        model="any", max_tokens=16, system="You are a helpful assistant.",
        messages=[{"role": "user", "content": "Explain the difference between TCP and UDP."}],
        extra_body={"temperature": 0.7})
    assert message.content[0].text and message.usage.output_tokens > 0
    with client.messages.stream(model="any", max_tokens=16, messages=[{"role": "user", "content": "Hi!"}]) as stream:
        assert "".join(stream.text_stream)
    assert client.messages.count_tokens(model="any", messages=[{"role": "user", "content": "Hi!"}]).input_tokens > 0


def test_mid_stream_failure_is_an_error_event(http, anthropic_client):
    """Past its deadline (here the SDK's own timeout header) a started stream ends with an `error` event."""
    body = {"model": MODEL, "max_tokens": 400, "ignore_eos": True, "stream": True, "messages": HELLO}
    with http.stream("POST", "/v1/messages", json=body, headers={"x-stainless-timeout": "1"}) as response:
        assert response.status_code == 200
        frames = response.read().decode().removesuffix("\n\n").split("\n\n")
    assert frames[0].startswith("event: message_start\n")
    name, data = frames[-1].split("\n")
    assert name == "event: error" and "message_stop" not in "".join(frames)
    error = types.error_response(json.loads(data.removeprefix("data: "))).error
    assert error.type == "timeout_error" and "timeout" in error.message
    with pytest.raises(anthropic.APIStatusError, match="timeout"):  # the SDK raises it
        with anthropic_client.messages.stream(model=MODEL, max_tokens=400, messages=HELLO,
                                              extra_body={"ignore_eos": True},
                                              extra_headers={"x-stainless-timeout": "1"}) as stream:
            for _ in stream.text_stream:
                pass
