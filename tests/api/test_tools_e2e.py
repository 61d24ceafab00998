"""Tool calling and structured outputs end to end: the real server with the default 135M model,
driven by the official OpenAI Python SDK (the TypeScript SDK runs the round trip in
tests/ts/tools_check.mjs), responses and stream chunks checked against OpenAI's schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
from api_helpers import assert_error, chat_body, stream_chunks

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["location"],
        },
    },
}
STOCK = {
    "type": "function",
    "function": {
        "name": "get_stock_price",
        "description": "Get the latest price of a stock",
        "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]},
    },
}
PING = {"type": "function", "function": {"name": "ping", "description": "Check that the service is up"}}
MARKUP = ("Tool:", "Topic:", "<tool_call>", "[TOOL_CALLS]")


def args_of(call) -> dict:
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict)
    return arguments


def assert_valid_call(call, tool: dict) -> dict:
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == tool["function"]["name"]
    arguments = args_of(call)
    jsonschema.validate(arguments, tool["function"].get("parameters") or {"type": "object"})
    return arguments


def test_round_trip_as_in_the_issue(openai_client, schema):
    """The issue's example verbatim (but for base_url): a call, the tool's result, a text answer."""
    tools = [WEATHER]
    messages = [{"role": "user", "content": "What's the weather in Tokyo?"}]
    response = openai_client.chat.completions.create(model="any", messages=messages, tools=tools, max_tokens=200)
    schema(response.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    tool_call = choice.message.tool_calls[0]
    assert assert_valid_call(tool_call, WEATHER)["location"] == "Tokyo"
    messages.append(choice.message)
    messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps({"temperature": 22})})
    final = openai_client.chat.completions.create(model="any", messages=messages, tools=tools, max_tokens=200, seed=1)
    schema(final.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    answer = final.choices[0].message
    assert answer.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
    assert answer.content and answer.content.strip()
    assert not any(m in answer.content for m in MARKUP)
    # both requests of the generic format are billed: the answer's prompt comes mostly from the cache
    assert final.usage.prompt_tokens > 0 and final.usage.completion_tokens > 0


def test_auto_small_talk_answers_in_text(openai_client):
    response = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Hi! Tell me a joke about cats."}], tools=[WEATHER],
        max_tokens=40, seed=3)
    choice = response.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert choice.message.content and not any(m in choice.message.content for m in MARKUP)


def test_required_makes_a_call_on_an_unrelated_question(openai_client):
    response = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Tell me a joke about cats."}], tools=[WEATHER],
        tool_choice="required", max_tokens=60)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) >= 1
    for call in choice.message.tool_calls:
        assert_valid_call(call, WEATHER)


@pytest.mark.parametrize("question, name, key, value", [
    ("How much is one share of AAPL right now?", "get_stock_price", "ticker", "AAPL"),
    ("What's the weather in Tokyo?", "get_weather", "location", "Tokyo"),
])
def test_named_tool_among_two(openai_client, question, name, key, value):
    response = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": question}], tools=[WEATHER, STOCK],
        tool_choice={"type": "function", "function": {"name": name}}, max_tokens=60)
    calls = response.choices[0].message.tool_calls
    assert len(calls) == 1 and response.choices[0].finish_reason == "tool_calls"
    assert assert_valid_call(calls[0], STOCK if name == "get_stock_price" else WEATHER)[key] == value


def test_two_cities_two_calls(openai_client):
    response = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What's the weather in Paris and in Rome?"}],
        tools=[WEATHER], max_tokens=120)
    calls = response.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert {assert_valid_call(c, WEATHER)["location"] for c in calls} == {"Paris", "Rome"}
    assert len({c.id for c in calls}) == 2


def test_parallel_tool_calls_false_gives_one_call(openai_client):
    response = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What's the weather in Paris and in Rome?"}],
        tools=[WEATHER], parallel_tool_calls=False, max_tokens=120)
    calls = response.choices[0].message.tool_calls
    assert len(calls) == 1
    assert_valid_call(calls[0], WEATHER)


def test_tool_without_parameters_gets_empty_object(openai_client):
    response = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Is the service up?"}], tools=[PING],
        tool_choice={"type": "function", "function": {"name": "ping"}}, max_tokens=30)
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "ping" and call.function.arguments == "{}"


def test_tool_choice_none_answers_in_text(openai_client):
    response = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What's the weather in Tokyo?"}], tools=[WEATHER],
        tool_choice="none", max_tokens=30, seed=2)
    message = response.choices[0].message
    assert message.tool_calls is None and message.content and not any(m in message.content for m in MARKUP)


def test_streamed_tool_calls_follow_openai(http, schema):
    """First piece of a call: index, id, type, name; then argument fragments that concatenate to
    valid JSON; exactly one finish_reason, "tool_calls"."""
    chunks = stream_chunks(http, "/v1/chat/completions", chat_body(
        "What's the weather in Paris and in Rome?", tools=[WEATHER], max_tokens=120, stream=True,
        stream_options={"include_usage": True}))
    for chunk in chunks:
        schema(chunk, "CreateChatCompletionStreamResponse")
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        assert not delta.get("content"), delta  # no markup or routing text as content
        for piece in delta.get("tool_calls", []):
            if piece["index"] not in calls:
                assert piece["id"].startswith("call_") and piece["type"] == "function"
                assert piece["function"]["name"] == "get_weather"
                calls[piece["index"]] = {"id": piece["id"], "arguments": piece["function"]["arguments"]}
            else:
                assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
        if choice["finish_reason"] is not None:
            finishes.append(choice["finish_reason"])
    assert finishes == ["tool_calls"]
    assert sorted(calls) == [0, 1]
    assert {json.loads(c["arguments"])["location"] for c in calls.values()} == {"Paris", "Rome"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_streamed_text_answer_with_tools(http):
    chunks = stream_chunks(http, "/v1/chat/completions", chat_body(
        "Hi! Tell me a joke about cats.", tools=[WEATHER], max_tokens=30, stream=True, seed=3))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text and not any(m in text for m in MARKUP)
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] in (["stop"], ["length"])


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_response_validates(openai_client, seed):
    response = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Give me a person named Bob aged 30 as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        max_tokens=60, seed=seed, temperature=0.7)
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)


def test_json_object_response_parses(openai_client):
    response = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        response_format={"type": "json_object"}, max_tokens=80, temperature=0)
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(response.choices[0].message.content), dict)
    else:  # cut at max_tokens: still a JSON object's beginning
        assert response.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                  "properties": {"x": {"type": "bogus"}}}}}]},
         "tools[0].function.parameters"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
         "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_invalid_tool_requests_are_400(http, fields, param):
    assert_error(http.post("/v1/chat/completions", json=chat_body(**fields)), 400, param=param)


def test_tool_message_without_matching_call_is_400(http):
    body = {"model": "any", "messages": [
        {"role": "user", "content": "What's the weather in Tokyo?"},
        {"role": "tool", "tool_call_id": "call_missing", "content": "22"}], "tools": [WEATHER]}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param="messages[1].tool_call_id")
