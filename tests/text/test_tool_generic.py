"""End to end with the default model (SmolLM2-135M, whose template knows nothing of tools): the
generic format through the offline engine, two requests when the model answers in text."""

from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema
import pytest

from layerserve.engine.request import SamplingParams
from layerserve.model.guided import GrammarCompiler
from layerserve.text.chat_template import ChatTemplate
from layerserve.text.tool_parsers import TOOL_FORMATS, ToolCall
from layerserve.text.tools import plan_chat

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get current weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current local time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}


@dataclass
class Reply:
    content: str | None
    tool_calls: list[ToolCall]
    requests: int


class Chat:
    """What the API layer does with a ChatPlan, on the offline engine."""

    def __init__(self) -> None:
        from layerserve.engine.llm import LLM

        self.llm = LLM(num_blocks=512, max_model_len=2048, progress=False)
        tok = self.llm.tokenizer
        self.template = ChatTemplate(tok.chat_template, tok.bos_token, tok.eos_token)
        self.format = TOOL_FORMATS.for_tokenizer(tok)
        self.compiler = GrammarCompiler(tok)

    def __call__(self, messages, temperature=0.0, max_tokens=120, **request) -> Reply:
        plan = plan_chat(self.format, messages, **request)
        requests = 0
        while True:
            requests += 1
            ids = self.llm.tokenizer.encode(self.template.render(plan.messages, tools=plan.tools))
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.0 if plan.greedy else temperature, seed=7,
                logits_mask_factory=self.compiler.compile(plan.constraint) if plan.constraint else None,
                skip_special_tokens=not plan.keep_special_tokens,
            )
            text = self.llm.generate([ids], params)[0].outputs[0].text
            parser = plan.new_parser()
            if parser is None:
                return Reply(text, [], requests)
            for piece in text:
                parser.feed(piece)
            parser.finish()
            if not parser.needs_answer:
                assert "Tool:" not in (parser.content or "") and "Topic:" not in (parser.content or "")
                return Reply(parser.content or None, parser.tool_calls, requests)
            plan = plan.answer


@pytest.fixture(scope="module")
def chat() -> Chat:
    return Chat()


def ask(text):
    return [{"role": "user", "content": text}]


def args(call):
    return json.loads(call.arguments)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_weather_question_calls_the_tool(chat, temperature):
    reply = chat(ask("What's the weather in Tokyo?"), temperature, tools=[WEATHER])
    assert reply.content is None and len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert call.name == "get_weather" and args(call)["location"] == "Tokyo" and call.id.startswith("call_")
    jsonschema.validate(args(call), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_small_talk_gets_text(chat, temperature):
    reply = chat(ask("Hi, how are you?"), temperature, tools=[WEATHER])
    assert reply.tool_calls == [] and reply.content and reply.requests == 2


def test_round_trip(chat):
    messages = ask("What's the weather in Tokyo?")
    first = chat(messages, tools=[WEATHER])
    call = first.tool_calls[0]
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 22})})
    final = chat(messages, tools=[WEATHER])
    assert final.tool_calls == [] and "22" in final.content and final.requests == 1


def test_required_on_an_unrelated_question(chat):
    reply = chat(ask("Who wrote Romeo and Juliet?"), tools=[WEATHER], tool_choice="required")
    assert reply.tool_calls and all(c.name == "get_weather" for c in reply.tool_calls)
    for call in reply.tool_calls:
        jsonschema.validate(args(call), WEATHER["function"]["parameters"])


def test_named_tool_among_two(chat):
    reply = chat(ask("What's the weather in Tokyo?"), tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.name for c in reply.tool_calls] == ["get_time"]
    jsonschema.validate(args(reply.tool_calls[0]), TIME["function"]["parameters"])


def test_two_cities_two_calls(chat):
    reply = chat(ask("What's the weather in Tokyo and in Paris?"), tools=[WEATHER])
    assert [args(c)["location"] for c in reply.tool_calls] == ["Tokyo", "Paris"]


def test_no_parallel_calls(chat):
    reply = chat(ask("What's the weather in Tokyo and in Paris?"), tools=[WEATHER], parallel_tool_calls=False)
    assert len(reply.tool_calls) == 1


def test_tool_choice_none_answers_in_text(chat):
    reply = chat(ask("What's the weather in Tokyo?"), tools=[WEATHER], tool_choice="none")
    assert reply.tool_calls == [] and reply.content and reply.requests == 1


def test_json_schema_response(chat):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}
    for temperature in (0.0, 0.7):
        reply = chat(ask("Give me a person named Ann aged 31 as JSON."), temperature, max_tokens=60,
                     response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        jsonschema.validate(json.loads(reply.content), schema)
