"""The Anthropic layer's two halves without a model: a request -> the chat pipeline's TurnRequest,
and ChoiceEvents -> content blocks and stream events (fed one piece at a time)."""

from __future__ import annotations

import pytest

import anthropic_types as types
from layerserve.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from layerserve.api.chat_turn import ChoiceEvent
from layerserve.api.errors import InvalidRequestError
from layerserve.api.messages import BlockWriter, stop_reason
from layerserve.api.messages_turn import messages_sampling, messages_turn_request
from layerserve.config import ServerConfig
from layerserve.text.tool_parsers import ToolCallDelta

TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def turn_of(**fields):
    return messages_turn_request(CountTokensRequest.model_validate({"model": "m", **fields}), ServerConfig())


def test_a_tool_round_trip_becomes_chat_messages():
    turn = turn_of(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "text", "text": "Sunny"}]},
                                         {"type": "text", "text": "Thanks, and?"}]},
        ],
        tools=[TOOL], tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    assert turn.messages == [
        {"role": "system", "content": "Be brief.\nUse tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "user", "content": "Thanks, and?"},
    ]
    assert turn.tools == [{"type": "function", "function": {"name": "get_weather", "parameters": TOOL["input_schema"]}}]
    assert turn.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert turn.parallel_tool_calls is False


@pytest.mark.parametrize(("choice", "expected"), [({"type": "auto"}, "auto"), ({"type": "any"}, "required"),
                                                  ({"type": "none"}, "none")])
def test_tool_choice(choice, expected):
    turn = turn_of(messages=[{"role": "user", "content": "hi"}], tools=[TOOL], tool_choice=choice)
    assert turn.tool_choice == expected and turn.parallel_tool_calls is None


def test_refusals():
    with pytest.raises(InvalidRequestError, match="tool_use"):
        turn_of(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]}])
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        turn_of(messages=[{"role": "user", "content": "hi"}], tool_choice={"type": "any"})
    with pytest.raises(InvalidRequestError, match="thinking"):
        turn_of(messages=[{"role": "user", "content": "hi"}], thinking={"type": "adaptive"})


def test_sampling():
    req = MessagesRequest.model_validate({"model": "m", "max_tokens": 7, "messages": [{"role": "user", "content": "x"}],
                                          "temperature": 0, "top_k": 5, "stop_sequences": ["", "END"]})
    params = messages_sampling(req)
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p, params.stop) == (7, 0, 5, 1.0, ["END"])


def test_block_writer_streams_text_then_a_call():
    writer = BlockWriter()
    feed = [ChoiceEvent(0, "Let me "), ChoiceEvent(0, "check."),
            ChoiceEvent(0, tool_calls=[ToolCallDelta(0, "toolu_a", "get_weather", "")]),
            ChoiceEvent(0, tool_calls=[ToolCallDelta(0, arguments='{"city": ')]),
            ChoiceEvent(0, tool_calls=[ToolCallDelta(0, arguments='"Rome"}')]),
            ChoiceEvent(0, finish_reason="tool_calls")]
    events = [e for event in feed for e in writer.feed(event)]
    for event in events:
        types.stream_event(event)
    assert [(e["type"], e["index"]) for e in events] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
        ("content_block_stop", 1)]
    assert events[4]["content_block"] == {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}
    assert writer.blocks == [{"type": "text", "text": "Let me check."},
                             {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Rome"}}]
    assert writer.stop_reason == "tool_use"


def test_stop_reasons():
    assert stop_reason("stop", None) == "end_turn"
    assert stop_reason("stop", "END") == "stop_sequence"
    assert stop_reason("length", None) == "max_tokens"
    assert stop_reason("tool_calls", None) == "tool_use"
