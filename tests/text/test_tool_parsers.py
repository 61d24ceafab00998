"""Streaming tool-call parsers, fed one token (and one character) at a time.

Each case checks what an OpenAI client would rebuild from the deltas: content without markup,
and calls whose first delta carries index, id and name and whose argument fragments concatenate
to JSON that parses.
"""

from __future__ import annotations

import json

import pytest

from layerserve.text.tool_parsers import TOOL_FORMATS, ParsedDelta, ToolSpec
from layerserve.text.tool_parsers.generic import tool_aliases

WEATHER = ToolSpec(
    "get_weather",
    "Get current weather for a city",
    {
        "type": "object",
        "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"],
    },
)
SEARCH = ToolSpec(
    "search_docs",
    "Search the documentation",
    {"type": "object", "properties": {"query": {"type": "object", "properties": {"text": {"type": "string"}}}}},
)
PING = ToolSpec("ping", "", {"type": "object", "properties": {}})
TOOLS = [WEATHER, SEARCH, PING]


def _ids():
    n = iter(range(1000))
    return lambda: f"call_{next(n):024d}"


def token_pieces(tokenizer, text: str) -> list[str]:
    """The text as the detokenizer would stream it: one token's text at a time."""
    return [tokenizer.decode([t], skip_special_tokens=False) for t in tokenizer.encode(text)]


def stream(parser, pieces: list[str]) -> tuple[str | None, list[dict]]:
    """Feed pieces, rebuild the OpenAI view from the deltas, check it against the parser's own."""
    deltas: list[ParsedDelta] = [parser.feed(p) for p in pieces] + [parser.finish()]
    content = "".join(d.content for d in deltas)
    calls: list[dict] = []
    for delta in deltas:
        for tc in delta.tool_calls:
            if tc.id is not None:
                assert tc.index == len(calls), "a new call must take the next index"
                assert tc.id.startswith("call_") and tc.name
                calls.append({"id": tc.id, "name": tc.name, "arguments": tc.arguments})
            else:
                assert tc.name is None and tc.index == len(calls) - 1
                calls[-1]["arguments"] += tc.arguments
    assert content == parser.content
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [(c.id, c.name, c.arguments) for c in parser.tool_calls]
    for call in calls:
        assert isinstance(json.loads(call["arguments"]), dict)
    return (content or None), calls


def parse_both_ways(fmt_name: str, tokenizer, text: str, tools=TOOLS):
    """Token pieces and single characters must give the same result."""
    fmt = TOOL_FORMATS.get(fmt_name)(tokenizer)
    by_token = stream(fmt.new_parser(tools, _ids()), token_pieces(tokenizer, text))
    by_char = stream(fmt.new_parser(tools, _ids()), list(text))
    assert by_token == by_char
    parser = fmt.new_parser(tools, _ids())
    stream(parser, token_pieces(tokenizer, text))
    return by_token[0], [(c["name"], json.loads(c["arguments"])) for c in by_token[1]], parser


# ---- Hermes / Qwen ----------------------------------------------------------------------------
def test_hermes_text_then_call(smollm_tokenizer):
    text = 'Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>'
    content, calls, _ = parse_both_ways("hermes", smollm_tokenizer, text)
    assert content == "Let me check."
    assert calls == [("get_weather", {"location": "Tokyo"})]


def test_hermes_parallel_calls_without_text(smollm_tokenizer):
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}\n</tool_call>'
    )
    content, calls, _ = parse_both_ways("hermes", smollm_tokenizer, text)
    assert content is None
    assert calls == [("get_weather", {"location": "Tokyo"}), ("get_weather", {"location": "Paris", "unit": "celsius"})]


def test_hermes_tricky_arguments_and_key_order(smollm_tokenizer):
    args = {"q": 'a}"b{ <tool_call> \\', "n": {"x": [1, {"y": 2}], "e": []}, "t": True}
    text = f'<tool_call>{{"arguments": {json.dumps(args)}, "name": "search_docs"}}</tool_call>'
    content, calls, _ = parse_both_ways("hermes", smollm_tokenizer, text)
    assert content is None
    assert calls == [("search_docs", args)]


def test_hermes_arguments_as_json_string_and_missing(smollm_tokenizer):
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"location\\": \\"Oslo\\"}"}</tool_call><tool_call>{"name": "ping"}</tool_call>'
    _, calls, _ = parse_both_ways("hermes", smollm_tokenizer, text)
    assert calls == [("get_weather", {"location": "Oslo"}), ("ping", {})]


def test_hermes_plain_text_keeps_lookalikes(smollm_tokenizer):
    text = "Use a < b, and <tool is not a marker; neither is <tool_c"
    content, calls, _ = parse_both_ways("hermes", smollm_tokenizer, text)
    assert content == text and calls == []


def test_hermes_holds_back_a_partial_marker(smollm_tokenizer):
    parser = TOOL_FORMATS.get("hermes")(smollm_tokenizer).new_parser(TOOLS, _ids())
    assert parser.feed("Sure <tool_").content == "Sure"
    delta = parser.feed('call>{"name": "ping", "arguments": {}}')
    assert delta.content == "" and delta.tool_calls[0].name == "ping"


# ---- Llama 3 JSON -----------------------------------------------------------------------------
def test_llama3_single_call(smollm_tokenizer):
    text = '{"name": "get_weather", "parameters": {"location": "Tokyo", "unit": "celsius"}}'
    content, calls, _ = parse_both_ways("llama3_json", smollm_tokenizer, text)
    assert content is None
    assert calls == [("get_weather", {"location": "Tokyo", "unit": "celsius"})]


def test_llama3_python_tag_and_separator(smollm_tokenizer):
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Tokyo"}}; {"name": "ping", "parameters": {}}'
    content, calls, _ = parse_both_ways("llama3_json", smollm_tokenizer, text)
    assert content is None
    assert calls == [("get_weather", {"location": "Tokyo"}), ("ping", {})]


def test_llama3_text(smollm_tokenizer):
    content, calls, _ = parse_both_ways("llama3_json", smollm_tokenizer, "The answer is {probably} 4.")
    assert content == "The answer is {probably} 4." and calls == []


# ---- Mistral ----------------------------------------------------------------------------------
def test_mistral_calls(smollm_tokenizer):
    text = (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Tokyo"}}, '
        '{"name": "get_weather", "arguments": {"location": "Paris"}}]'
    )
    content, calls, _ = parse_both_ways("mistral", smollm_tokenizer, text)
    assert content is None
    assert calls == [("get_weather", {"location": "Tokyo"}), ("get_weather", {"location": "Paris"})]


def test_mistral_text(smollm_tokenizer):
    content, calls, _ = parse_both_ways("mistral", smollm_tokenizer, "Paris is the capital [of France].")
    assert content == "Paris is the capital [of France]." and calls == []


# ---- generic ----------------------------------------------------------------------------------
def test_generic_aliases():
    aliases = tool_aliases([WEATHER, SEARCH, PING, ToolSpec("getWeather", "", {}), ToolSpec("none", "", {})])
    assert aliases["search_docs"] is SEARCH and aliases["ping"] is PING
    assert "weather" not in aliases  # get_weather and getWeather collide: full names
    assert {"get_weather", "getWeather", "none_tool"} <= set(aliases)


def test_generic_line_call(smollm_tokenizer):
    text = "Topic: weather in Tokyo\nTool: weather\nlocation: Tokyo\nunit: celsius"
    content, calls, parser = parse_both_ways("generic", smollm_tokenizer, text)
    assert content is None and not parser.needs_answer
    assert calls == [("get_weather", {"location": "Tokyo", "unit": "celsius"})]


def test_generic_escapes_and_json_form(smollm_tokenizer):
    text = 'Topic: x\nTool: weather\nlocation: Tokyo "the \\ city" {x}\nTool: search_docs {"query": {"text": "a}b"}}'
    _, calls, _ = parse_both_ways("generic", smollm_tokenizer, text)
    assert calls == [("get_weather", {"location": 'Tokyo "the \\ city" {x}'}), ("search_docs", {"query": {"text": "a}b"}})]


def test_generic_drops_repeats_and_unfinished_calls(smollm_tokenizer):
    text = (
        "Topic: weather\nTool: weather\nlocation: Tokyo\nTool: weather\nlocation: Paris\n"
        "Tool: weather\nlocation: Tokyo\nunit: fahrenheit\nTool: weather"
    )
    _, calls, _ = parse_both_ways("generic", smollm_tokenizer, text)
    assert calls == [("get_weather", {"location": "Tokyo"}), ("get_weather", {"location": "Paris"})]


def test_generic_call_without_arguments(smollm_tokenizer):
    _, calls, _ = parse_both_ways("generic", smollm_tokenizer, "Topic: ping\nTool: ping")
    assert calls == [("ping", {})]


def test_generic_none_asks_for_an_answer(smollm_tokenizer):
    content, calls, parser = parse_both_ways("generic", smollm_tokenizer, "Topic: greeting\nTool: none")
    assert content is None and calls == [] and parser.needs_answer


def test_generic_unshaped_output_is_content(smollm_tokenizer):
    content, calls, parser = parse_both_ways("generic", smollm_tokenizer, "Tomorrow it rains.")
    assert content == "Tomorrow it rains." and calls == [] and not parser.needs_answer


def test_generic_first_call_streams_before_it_ends(smollm_tokenizer):
    parser = TOOL_FORMATS.get("generic")(smollm_tokenizer).new_parser(TOOLS, _ids())
    assert not parser.feed("Topic: weather\nTool:")
    delta = parser.feed(" weather\nlocation: To")
    assert delta.tool_calls[0].name == "get_weather" and delta.tool_calls[0].arguments == '{"location": "To'
    assert parser.feed("kyo").tool_calls[0].arguments == "kyo"


@pytest.mark.parametrize("fmt_name", ["hermes", "llama3_json", "mistral", "generic"])
def test_parsers_never_leak_markup(smollm_tokenizer, fmt_name):
    fmt = TOOL_FORMATS.get(fmt_name)(smollm_tokenizer)
    sample = {
        "hermes": '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
        "llama3_json": '{"name": "ping", "parameters": {}}',
        "mistral": '[TOOL_CALLS] [{"name": "ping", "arguments": {}}]',
        "generic": "Topic: ping\nTool: ping",
    }[fmt_name]
    parser = fmt.new_parser(TOOLS, _ids())
    for piece in token_pieces(smollm_tokenizer, sample):
        assert parser.feed(piece).content == ""
    assert parser.finish().content == "" and len(parser.tool_calls) == 1
