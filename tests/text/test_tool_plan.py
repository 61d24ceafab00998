"""Request planning: validation (the 400s), message shapes for templates, format detection, and
the grammar of every format and tool_choice mode accepting what it should and nothing else."""

from __future__ import annotations

import pytest

from layerserve.model.guided import GrammarCompiler
from layerserve.text.tool_parsers import TOOL_FORMATS, ChoiceMode
from layerserve.text.tool_parsers.mistral import mistral_call_id
from layerserve.text.tools import ToolRequestError, normalize_messages, parse_tool_choice, parse_tools, plan_chat

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
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": {
    "type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
PING = {"type": "function", "function": {"name": "ping"}}
ASK = [{"role": "user", "content": "What's the weather in Tokyo?"}]
CALL = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Tokyo"}'}}
ROUND_TRIP = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 22}'},
]


@pytest.fixture(scope="module")
def compiler(smollm_tokenizer):
    return GrammarCompiler(smollm_tokenizer)


def fmt(name, tokenizer):
    return TOOL_FORMATS.get(name)(tokenizer)


def accepts(compiler, tokenizer, constraint, text: str) -> bool:
    mask = compiler.compile(constraint)()
    for token in tokenizer.encode(text):
        if not mask.allowed_mask()[token]:
            return False
        mask.accept(token)
    return mask.is_accepting()


# ---- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tools, param",
    [
        ([{"type": "custom", "custom": {"name": "x"}}], "tools[0]"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}],
         "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}],
         "tools[0].function.parameters"),
    ],
)
def test_invalid_tools(tools, param):
    with pytest.raises(ToolRequestError) as info:
        parse_tools(tools)
    assert info.value.param == param


def test_tools_defaults_and_lenient_keywords():
    specs = parse_tools([PING, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"u": {"type": "string", "format": "made-up"}}}}}])
    assert specs[0].parameters == {"type": "object", "properties": {}} and specs[0].description == ""


def test_tool_choice():
    specs = parse_tools([WEATHER, TIME])
    assert parse_tool_choice(None, specs).mode is ChoiceMode.AUTO
    assert parse_tool_choice(None, []).mode is ChoiceMode.NONE
    named = parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, specs)
    assert named.mode is ChoiceMode.NAMED and named.name == "get_time"
    allowed = parse_tool_choice({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}, specs)
    assert allowed.mode is ChoiceMode.REQUIRED and allowed.allowed == ("get_time",)
    for bad in ({"type": "function", "function": {"name": "nope"}}, "sometimes", {"type": "custom"}):
        with pytest.raises(ToolRequestError):
            parse_tool_choice(bad, specs)
    with pytest.raises(ToolRequestError):
        parse_tool_choice("required", [])


def test_tool_message_must_answer_a_call():
    with pytest.raises(ToolRequestError) as info:
        normalize_messages(ASK + [{"role": "tool", "tool_call_id": "call_zzz", "content": "1"}])
    assert info.value.param == "messages[1].tool_call_id"


def test_normalized_messages_have_template_shapes():
    out = normalize_messages(ROUND_TRIP + [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert "content" not in out[1]  # None is dropped
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"location": "Tokyo"}
    assert out[2]["name"] == "get_weather"
    assert out[3]["content"] == "ab"
    assert ROUND_TRIP[1]["tool_calls"][0]["function"]["arguments"] == '{"location": "Tokyo"}'  # input untouched


def test_call_arguments_that_are_not_json_stay_text():
    """A call cut off by max_tokens comes back in the history as the model wrote it: not an error."""
    cut = {"id": "call_cut", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Tok'}}
    out = normalize_messages(ASK + [{"role": "assistant", "content": None, "tool_calls": [cut]},
                                    {"role": "tool", "tool_call_id": "call_cut", "content": "?"}])
    assert out[1]["tool_calls"][0]["function"]["arguments"] == '{"location": "Tok'
    deep = dict(cut, function={"name": "f", "arguments": '{"a": ' * 5000 + "1" + "}" * 5000})
    with pytest.raises(ToolRequestError) as info:
        normalize_messages(ASK + [{"role": "assistant", "content": None, "tool_calls": [deep]}])
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"


def test_invalid_response_format(smollm_tokenizer):
    with pytest.raises(ToolRequestError) as info:
        plan_chat(fmt("generic", smollm_tokenizer), ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": 3}}}}})
    assert info.value.param == "response_format"


# ---- detection and message shapes ---------------------------------------------------------------
def test_format_detection(smollm_tokenizer):
    assert TOOL_FORMATS.detect("{% for m in messages %}<tool_call>{{ m }}</tool_call>{% endfor %}").name == "hermes"
    assert TOOL_FORMATS.detect("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]").name == "mistral"
    assert TOOL_FORMATS.detect('<|start_header_id|>{{ "<|python_tag|>" }}').name == "llama3_json"
    assert TOOL_FORMATS.detect(smollm_tokenizer.chat_template).name == "generic"
    assert TOOL_FORMATS.for_tokenizer(smollm_tokenizer).name == "generic"


def test_mistral_ids_fit_its_template(smollm_tokenizer):
    messages, tools = fmt("mistral", smollm_tokenizer).prepare_messages(normalize_messages(ROUND_TRIP), parse_tools([WEATHER]), None)
    call_id = messages[1]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum() and messages[2]["tool_call_id"] == call_id == mistral_call_id("call_abc")
    assert tools[0]["function"]["name"] == "get_weather"


def test_llama3_splits_parallel_calls(smollm_tokenizer):
    second = {**CALL, "id": "call_def"}
    messages = normalize_messages(ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL, second]}])
    out, _ = fmt("llama3_json", smollm_tokenizer).prepare_messages(messages, [], None)
    assert [len(m.get("tool_calls", [])) for m in out] == [0, 1, 1]


def test_generic_renders_calls_and_results_as_text(smollm_tokenizer):
    plan = plan_chat(fmt("generic", smollm_tokenizer), [{"role": "system", "content": "Be brief."}] + ROUND_TRIP + [
        {"role": "user", "content": "And the time in Tokyo?"}], tools=[WEATHER, TIME])
    system, user, call, result, follow_up = plan.messages
    assert system["content"].startswith("Be brief.\n\n") and "- weather: Get current weather for a city." in system["content"]
    assert call == {"role": "assistant", "content": "Topic: weather\nTool: weather\nlocation: Tokyo"}
    assert result == {"role": "user", "content": 'weather returned: {"temperature": 22}'}
    assert all(isinstance(m["content"], str) for m in plan.messages) and plan.tools is None
    # the answer request sees the call in words, and no routing instructions
    assert plan.answer.messages[2]["content"] == 'Calling weather with {"location": "Tokyo"}.'
    assert plan.answer.messages[0] == {"role": "system", "content": "Be brief."}


# ---- plans --------------------------------------------------------------------------------------
def test_generic_plans(smollm_tokenizer):
    generic = fmt("generic", smollm_tokenizer)
    auto = plan_chat(generic, ASK, tools=[WEATHER])
    assert auto.greedy and auto.answer is not None and auto.answer.format is None
    assert "\nchoice: calls | (" in auto.constraint.grammar
    required = plan_chat(generic, ASK, tools=[WEATHER], tool_choice="required")
    assert required.answer is None and "\nchoice: calls\n" in required.constraint.grammar
    none = plan_chat(generic, ASK, tools=[WEATHER], tool_choice="none")
    assert none.format is None and none.constraint is None and "Tools exist" in none.messages[0]["content"]
    # after the result of the only tool, auto answers in text directly
    after = plan_chat(generic, ROUND_TRIP, tools=[WEATHER])
    assert after.format is None and after.constraint is None
    plain = plan_chat(generic, ASK, response_format={"type": "json_object"})
    assert plain.format is None and plain.constraint.grammar.startswith("start: %json")


def test_plan_without_tools_is_plain(smollm_tokenizer):
    plan = plan_chat(fmt("hermes", smollm_tokenizer), ASK)
    assert plan.constraint is None and plan.format is None and plan.tools is None


# ---- grammars -----------------------------------------------------------------------------------
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>'
CASES = {
    "hermes": {
        "text": "It is sunny.",
        "call": HERMES_CALL,
        "text+call": "Let me look.\n" + HERMES_CALL,
        "two": HERMES_CALL + "\n" + HERMES_CALL.replace("Tokyo", "Paris"),
        "time": '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "JST"}}\n</tool_call>',
        "bad args": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>',
        "leak": "Sure <tool_call> no",
    },
    "llama3_json": {
        "text": "It is sunny.",
        "call": '{"name": "get_weather", "parameters": {"location": "Tokyo"}}',
        "two": '{"name": "get_weather", "parameters": {"location": "Tokyo"}}; {"name": "get_weather", "parameters": {"location": "Paris"}}',
        "time": '{"name": "get_time", "parameters": {"timezone": "JST"}}',
        "bad args": '{"name": "get_weather", "parameters": {"location": 3}}',
        "leak": '{"name": "nope"}',
    },
    "mistral": {
        "text": "It is sunny.",
        "call": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Tokyo"}}]',
        "two": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Tokyo"}}, {"name": "get_weather", "arguments": {"location": "Paris"}}]',
        "time": '[TOOL_CALLS] [{"name": "get_time", "arguments": {"timezone": "JST"}}]',
        "bad args": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {}}]',
        "leak": "Sure [TOOL_CALLS] no",
    },
    "generic": {
        "none": "Topic: greeting\nTool: none",
        "call": "Topic: weather\nTool: weather\nlocation: Tokyo",
        "two": "Topic: weather\nTool: weather\nlocation: Tokyo\nunit: celsius\nTool: weather\nlocation: Paris",
        "time": "Topic: time\nTool: time\ntimezone: JST",
        "bad args": "Topic: weather\nTool: weather\nunit: celsius",
        "leak": "Topic: weather\nTool: weather\nlocation: Tokyo\nTool: time\ntimezone: JST",
    },
}
# what each mode accepts, per case name (missing: rejected)
MODES = {
    "auto": {"text", "none", "call", "text+call", "two", "time"},
    "no-parallel": {"text", "none", "call", "text+call", "time"},
    "required": {"call", "two", "time"},
    "named": {"time"},
    "none": {"text"},
}


@pytest.mark.parametrize("fmt_name", sorted(CASES))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_grammar_modes(smollm_tokenizer, compiler, fmt_name, mode):
    choice = {"named": {"type": "function", "function": {"name": "get_time"}}, "no-parallel": "auto"}.get(mode, mode)
    plan = plan_chat(fmt(fmt_name, smollm_tokenizer), ASK, tools=[WEATHER, TIME], tool_choice=choice,
                     parallel_tool_calls=mode != "no-parallel")
    if plan.format is None:  # the generic format answers "none" in a plain text request
        assert fmt_name == "generic" and mode == "none" and plan.constraint is None
        return
    for case, text in CASES[fmt_name].items():
        expected = case in MODES[mode]
        assert accepts(compiler, smollm_tokenizer, plan.constraint, text) == expected, (case, text)


def test_response_format_inside_tool_grammar(smollm_tokenizer, compiler):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    plan = plan_chat(fmt("hermes", smollm_tokenizer), ASK, tools=[WEATHER],
                     response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert accepts(compiler, smollm_tokenizer, plan.constraint, '{"answer": "sunny"}')
    assert accepts(compiler, smollm_tokenizer, plan.constraint, HERMES_CALL)
    assert not accepts(compiler, smollm_tokenizer, plan.constraint, "sunny")


def test_generic_grammar_stops_at_a_repeated_call(smollm_tokenizer, compiler):
    plan = plan_chat(fmt("generic", smollm_tokenizer), ASK, tools=[WEATHER])
    mask = compiler.compile(plan.constraint)()
    text = "Topic: weather\nTool: weather\nlocation: Tokyo\nunit: celsius\nTool: weather\nlocation: Tokyo\nTool:"
    for token in smollm_tokenizer.encode(text):
        assert not mask.is_finished()
        mask.accept(token)
    assert mask.is_finished()
    assert mask.allowed_mask().nonzero().squeeze(1).tolist() == sorted(smollm_tokenizer.eos_token_ids)


def test_generic_decision_starts_with_a_spaced_token(smollm_tokenizer, compiler):
    """After "Tool:", no lone-space token: the tool word's first token carries the space."""
    plan = plan_chat(fmt("generic", smollm_tokenizer), ASK, tools=[WEATHER])
    mask = compiler.compile(plan.constraint)()
    for token in smollm_tokenizer.encode("Topic: weather\nTool:"):
        mask.accept(token)
    allowed = [smollm_tokenizer.decode([t]) for t in mask.allowed_mask().nonzero().squeeze(1).tolist()]
    assert " " not in allowed and " weather" in allowed and " none" in allowed
    assert all(piece.startswith(" ") and len(piece) > 1 for piece in allowed)
