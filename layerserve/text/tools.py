"""Tools and structured outputs for one chat request: OpenAI-shaped JSON in, a `ChatPlan` out.

The API layer calls, once per loaded model:

    fmt = TOOL_FORMATS.for_tokenizer(tokenizer)        # the model's tool-call format
    compiler = GrammarCompiler(tokenizer)              # layerserve.model.guided

and per chat request:

    plan = plan_chat(fmt, messages, tools=..., tool_choice=..., parallel_tool_calls=...,
                     response_format=...)               # ToolRequestError -> HTTP 400
    while plan is not None:
        prompt = template.render(plan.messages, tools=plan.tools)
        params.logits_mask_factory = compiler.compile(plan.constraint) if plan.constraint else None
        if plan.keep_special_tokens: params.skip_special_tokens = False
        if plan.greedy: params.temperature = 0.0
        parser = plan.new_parser()                     # per choice; None: the text is content
        ... run the request; feed each text delta to parser.feed(), then parser.finish() ...
        plan = plan.answer if parser is not None and parser.needs_answer else None

`plan.answer` exists for formats that write text answers in a separate request (the generic
format): the first request only decides between calling tools and answering.

Everything here takes and returns plain JSON data (dicts and lists), never pydantic models.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from layerserve.text.tool_parsers import TOOL_FORMATS  # noqa: F401  (re-exported; registers the formats)
from layerserve.text.tool_parsers.base import (
    ChoiceMode,
    Constraint,
    ToolCallParser,
    ToolChoice,
    ToolFormat,
    ToolSpec,
    new_call_id,
)
from layerserve.text.tool_parsers.schema import EMPTY_OBJECT_SCHEMA, json_schema_rule, schema_error


class ToolRequestError(ValueError):
    """The request's tools, tool_choice, tool messages or response_format are invalid (HTTP 400).
    `param` names the offending request field, as OpenAI's error envelope does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(slots=True)
class ChatPlan:
    """How to run one chat request: what the template renders, the constraint, how to parse."""

    messages: list[dict[str, Any]]  # for ChatTemplate.render
    tools: list[dict[str, Any]] | None = None  # for ChatTemplate.render(tools=...); None: not shown there
    constraint: Constraint | None = None  # for GrammarCompiler.compile; None: unconstrained
    keep_special_tokens: bool = False  # decode special tokens: the parser needs the format's markers
    format: ToolFormat | None = None  # None: the output is plain content
    tool_specs: list[ToolSpec] = field(default_factory=list)  # the request's tools
    # The text-answer request to run when the parser reports `needs_answer` (generic format).
    answer: ChatPlan | None = None
    greedy: bool = False  # sample this request greedily (temperature 0) whatever was asked

    @property
    def routes_only(self) -> bool:
        """The output only routes (tool calls, or "answer in text"); a separate request writes
        any text answer, so the output itself is never content."""
        return self.format is not None and self.format.separate_answer

    def new_parser(self, id_factory: Callable[[], str] = new_call_id) -> ToolCallParser | None:
        """A streaming parser for one choice's output, or None when the output is plain content."""
        if self.format is None:
            return None
        return self.format.new_parser(self.tool_specs, id_factory)


def plan_chat(
    fmt: ToolFormat,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
    response_format: dict[str, Any] | None = None,
) -> ChatPlan:
    """Validate the tool-related parts of a chat request and plan its rendering and decoding.

    Raises ToolRequestError for: tools that are not function tools or whose parameters schema is
    invalid, duplicate tool names, a tool_choice without tools or naming a tool not among them,
    tool messages that answer no earlier call, and a response_format with an invalid schema.
    """
    specs = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, specs)
    normalized = normalize_messages(messages)
    content_rule = response_format_rule(response_format)
    content = Constraint(f"start: {content_rule}\n") if content_rule else None
    callable_tools = _callable_tools(fmt, normalized, specs, choice)
    requested = choice
    if not callable_tools:
        choice = ToolChoice(ChoiceMode.NONE)
    if fmt.separate_answer:
        answer = ChatPlan(fmt.answer_messages(normalized, specs, requested), constraint=content)
        if choice.mode is ChoiceMode.NONE:
            return answer
    else:
        answer = None
        if not specs:
            template_messages, _ = fmt.prepare_messages(normalized, specs, choice)
            return ChatPlan(template_messages, constraint=content)
    template_messages, template_tools = fmt.prepare_messages(normalized, specs, choice)
    parallel = parallel_tool_calls is not False and choice.mode is not ChoiceMode.NAMED
    constraint = fmt.grammar(callable_tools, choice, parallel, content_rule)
    return ChatPlan(
        template_messages,
        template_tools,
        constraint,
        fmt.keeps_special_tokens,
        fmt,
        specs,
        answer if choice.mode is ChoiceMode.AUTO else None,
        fmt.greedy_calls,
    )


def parse_tools(tools: list[dict[str, Any]] | None) -> list[ToolSpec]:
    """OpenAI `tools` -> ToolSpecs; parameters default to an empty object schema."""
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolRequestError("Only tools of type 'function' are supported.", param)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ToolRequestError("A function tool needs a 'name'.", f"{param}.function.name")
        if name in seen:
            raise ToolRequestError(f"Duplicate tool name {name!r}.", f"{param}.function.name")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is None or parameters == {}:
            parameters = EMPTY_OBJECT_SCHEMA
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolRequestError(
                f"Invalid schema for function {name!r}: the parameters schema must be of type 'object'.",
                f"{param}.function.parameters",
            )
        error = schema_error(parameters)
        if error is not None:
            raise ToolRequestError(f"Invalid schema for function {name!r}: {error}", f"{param}.function.parameters")
        specs.append(ToolSpec(name, function.get("description") or "", parameters))
    return specs


def parse_tool_choice(tool_choice: str | dict[str, Any] | None, tools: list[ToolSpec]) -> ToolChoice:
    """OpenAI `tool_choice` -> ToolChoice. Defaults: "auto" with tools, "none" without.
    `{"type": "allowed_tools", ...}` becomes AUTO / REQUIRED over the allowed subset
    (as `ToolChoice.allowed`)."""
    if tool_choice is None:
        return ToolChoice(ChoiceMode.AUTO if tools else ChoiceMode.NONE)
    names = {t.name for t in tools}
    if isinstance(tool_choice, str):
        try:
            mode = ChoiceMode(tool_choice)
        except ValueError:
            raise ToolRequestError(f"Invalid tool_choice {tool_choice!r}.", "tool_choice") from None
        if mode is ChoiceMode.NAMED:
            raise ToolRequestError(f"Invalid tool_choice {tool_choice!r}.", "tool_choice")
        if mode is not ChoiceMode.NONE and not tools:
            raise ToolRequestError("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        return ToolChoice(mode)
    if not isinstance(tool_choice, dict):
        raise ToolRequestError("Invalid tool_choice.", "tool_choice")
    kind = tool_choice.get("type")
    if kind == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise ToolRequestError(f"Tool choice {name!r} is not among the provided tools.", "tool_choice")
        return ToolChoice(ChoiceMode.NAMED, name)
    if kind == "allowed_tools":
        spec = tool_choice.get("allowed_tools") or {}
        mode = spec.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise ToolRequestError(f"Invalid allowed_tools mode {mode!r}.", "tool_choice")
        allowed = []
        for entry in spec.get("tools") or []:
            name = (entry.get("function") or {}).get("name") if isinstance(entry, dict) else None
            if name not in names:
                raise ToolRequestError(f"Allowed tool {name!r} is not among the provided tools.", "tool_choice")
            allowed.append(name)
        return ToolChoice(ChoiceMode(mode), allowed=tuple(allowed))
    raise ToolRequestError(f"Unsupported tool_choice type {kind!r}.", "tool_choice")


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages in the shape Hugging Face chat templates expect, validated.

    - text-part lists become strings;
    - assistant `tool_calls` keep id/type/function, with `function.arguments` parsed into an
      object when it is JSON (templates `tojson` them);
    - `tool` messages must answer a call of an earlier assistant message; they gain that call's
      function `name` (some templates print it).
    """
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if "content" in message:
            message["content"] = _text_content(message["content"])
        if role == "assistant" and message.get("tool_calls"):
            message["tool_calls"] = [_template_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(message["tool_calls"])]
            for call in message["tool_calls"]:
                call_names[call["id"]] = call["function"]["name"]
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in call_names:
                raise ToolRequestError(
                    f"Invalid 'messages[{i}]': a message with role 'tool' must answer a preceding "
                    f"message with 'tool_calls' (no call with id {call_id!r}).",
                    f"messages[{i}].tool_call_id",
                )
            message["name"] = call_names[call_id]
        out.append(message)
    return out


def response_format_rule(response_format: dict[str, Any] | None) -> str | None:
    """A Lark expression the content must match for `response_format`, or None for text."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_rule({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            schema = {"type": "object"}
        error = schema_error(schema)
        if error is not None:
            raise ToolRequestError(f"Invalid schema for response_format: {error}", "response_format")
        return json_schema_rule(schema)
    raise ToolRequestError(f"Invalid response_format type {kind!r}.", "response_format")


def _callable_tools(fmt: ToolFormat, messages: list[dict[str, Any]], tools: list[ToolSpec], choice: ToolChoice) -> list[ToolSpec]:
    if choice.mode is ChoiceMode.NONE:
        return []
    if choice.mode is ChoiceMode.NAMED:
        return [t for t in tools if t.name == choice.name]
    allowed = [t for t in tools if choice.allowed is None or t.name in choice.allowed]
    if choice.mode is ChoiceMode.AUTO and fmt.answer_after_results and messages and messages[-1].get("role") == "tool":
        answered = {m.get("name") for m in _trailing_results(messages)}
        allowed = [t for t in allowed if t.name not in answered]
    return allowed


def _trailing_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.append(message)
    return results


def _text_content(content: Any) -> Any:
    """A list of text parts as one string; anything else unchanged."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content


def _template_call(call: Any, param: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not call.get("id"):
        raise ToolRequestError("A tool call needs an 'id' and a 'function' with a 'name'.", param)
    arguments = function.get("arguments")
    try:
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:  # e.g. a call cut off by max_tokens, sent back as it came: kept as text
                parsed = None
            if isinstance(parsed, dict):
                arguments = parsed
        arguments = copy.deepcopy(arguments)  # also probes the depth the template will walk
    except RecursionError:
        raise ToolRequestError("Invalid tool call 'arguments': nested too deeply.",
                               f"{param}.function.arguments") from None
    return {"id": call["id"], "type": "function", "function": {"name": function["name"], "arguments": arguments}}
