"""A chat request -> a `TurnRequest` -> a `ChatPlan` (layerserve.text.tools) -> prompt token ids
and sampling params.

Each API surface (chat completions here, Anthropic messages in messages_turn.py) checks what it
cannot honour and translates its request into a `TurnRequest`; from there every surface is
planned, rendered and constrained the same way.

The prompt is `tokenizer.encode_prompt(template.render(messages, tools))`, with every string the
request supplied kept literal (`PromptLiterals`): only the template's own markup becomes control
tokens, so a message cannot close its turn and open a system one by writing "<|im_end|>". The
template itself writes BOS where the model wants one.

All of this is CPU work (jinja, tokenizing, JSON-schema checks, grammar compilation): the API
runs it on the runtime's prep threads (`Runtime.offload` of `prepare_turn`),
never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from layerserve.api.errors import InvalidRequestError, NotSupportedError
from layerserve.api.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    CustomTool,
    FunctionMessage,
    NamedCustomToolChoice,
    RefusalPart,
    TextPart,
    ToolMessage,
)
from layerserve.api.state import Runtime
from layerserve.config import ServerConfig
from layerserve.engine.request import SamplingParams
from layerserve.model.guided import GrammarError
from layerserve.text.tools import ChatPlan, ToolRequestError, plan_chat

# Request fields this server cannot honour: rejected when set (to anything but these values).
_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None,),
    "function_call": (None,),
    "moderation": (None,),
    "verbosity": (None,),
    "store": (None, False),
}
_WHY = {
    "functions": "it is deprecated; use 'tools'",
    "function_call": "it is deprecated; use 'tool_choice'",
    "store": "this server does not store completions",
}
_TEMPLATE_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "documents"})


def check_unsupported(req: ChatCompletionRequest) -> None:
    for name, allowed in _UNSUPPORTED.items():
        value = getattr(req, name)
        if value not in allowed:
            why = _WHY.get(name, "this server does not implement it")
            raise NotSupportedError(f"The '{name}' parameter is not supported: {why}.", name)
    if req.modalities is not None and "audio" in req.modalities:
        raise NotSupportedError("Audio output is not supported: this model generates text only.", "modalities")


def _text(content: str | list | None, where: str) -> str:
    """Flatten string-or-parts content to text; non-text parts are refused by name."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
        else:
            raise NotSupportedError(
                f"Content parts of type '{part.type}' are not supported: this model reads text only.",
                f"{where}.content[{j}]",
            )
    return "\n".join(texts)


def template_messages(messages: list, config: ServerConfig) -> list[dict[str, Any]]:
    """Validated messages -> the plain dicts templates expect (text content, "developer" as "system")."""
    if len(messages) > config.max_messages:
        raise InvalidRequestError(f"Too many messages: {len(messages)} (the limit is {config.max_messages}).",
                                  "messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(msg, FunctionMessage):
            raise NotSupportedError("The 'function' role is deprecated and not supported; use 'tool' messages.",
                                    f"{where}.role")
        # Templates know "system"; OpenAI's "developer" role means the same thing.
        role = "system" if msg.role == "developer" else msg.role
        item: dict[str, Any] = {"role": role, "content": _text(msg.content, where)}
        if isinstance(msg, AssistantMessage):
            if msg.content is None and msg.refusal is not None:
                item["content"] = msg.refusal
            elif msg.content is None and not msg.tool_calls:
                raise InvalidRequestError("An assistant message needs 'content' unless it has 'tool_calls'.",
                                          f"{where}.content")
            if msg.audio is not None or msg.function_call is not None:
                field = "audio" if msg.audio is not None else "function_call"
                raise NotSupportedError(f"Assistant messages with '{field}' are not supported.", f"{where}.{field}")
            if msg.tool_calls:
                item["tool_calls"] = [call.model_dump() for call in msg.tool_calls]
        elif isinstance(msg, ToolMessage):
            item["tool_call_id"] = msg.tool_call_id
        if getattr(msg, "name", None) is not None:
            item["name"] = msg.name
        out.append(item)
    return out


def check_tools(req: ChatCompletionRequest, config: ServerConfig) -> None:
    """What pydantic cannot say about tools: non-empty, within limits, function tools only.
    (tool_choice names and parameter schemas are checked by `plan_chat`.)"""
    if not req.tools:
        if req.tools is not None:
            raise InvalidRequestError("Invalid 'tools': empty array. Expected an array with at least one tool.", "tools")
        if req.tool_choice is not None and req.tool_choice != "none":
            raise InvalidRequestError("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        if req.parallel_tool_calls is not None:
            raise InvalidRequestError("'parallel_tool_calls' is only allowed when 'tools' are specified.",
                                      "parallel_tool_calls")
        return
    if len(req.tools) > config.max_tools:
        raise InvalidRequestError(f"Too many tools: {len(req.tools)} (the limit is {config.max_tools}).", "tools")
    for i, tool in enumerate(req.tools):
        if isinstance(tool, CustomTool):
            raise NotSupportedError("Custom tools are not supported; use function tools.", f"tools[{i}]")
    if isinstance(req.tool_choice, NamedCustomToolChoice):
        raise NotSupportedError("Custom tools are not supported; use function tools.", "tool_choice")


def _plain(value: Any) -> Any:
    """A pydantic value as the plain JSON data the tool layer takes."""
    return value.model_dump(exclude_none=True, by_alias=True) if isinstance(value, BaseModel) else value


@dataclass(slots=True)
class TurnRequest:
    """One chat turn as every API surface hands it over (chat completions, Anthropic messages):
    plain JSON data in the tool layer's shapes, already checked by the surface's own rules."""

    messages: list[dict[str, Any]]  # template messages: role, text content, tool_calls / tool_call_id
    tools: list[dict[str, Any]] | None = None  # function tools: {"type": "function", "function": {...}}
    tool_choice: str | dict[str, Any] | None = None  # "auto" / "required" / "none" / a named function
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template


def chat_turn_request(req: ChatCompletionRequest, config: ServerConfig) -> TurnRequest:
    """A chat completion request as a `TurnRequest`, after the checks only chat needs."""
    check_unsupported(req)
    messages = template_messages(req.messages, config)
    check_tools(req, config)
    extra = req.chat_template_kwargs or {}
    clash = _TEMPLATE_RESERVED.intersection(extra)
    if clash:
        raise InvalidRequestError(f"'chat_template_kwargs' may not set {sorted(clash)}.", "chat_template_kwargs")
    return TurnRequest(messages, [_plain(t) for t in req.tools] if req.tools else None, _plain(req.tool_choice),
                       req.parallel_tool_calls, _plain(req.response_format), req.chat_template_kwargs)


def plan_turn(turn: TurnRequest, rt: Runtime) -> ChatPlan:
    """Plan a turn: what the template renders, the output constraint (tools, response_format)
    and how the output is parsed. Every problem is a 400."""
    try:
        return plan_chat(rt.tool_format, turn.messages, tools=turn.tools, tool_choice=turn.tool_choice,
                         parallel_tool_calls=turn.parallel_tool_calls, response_format=turn.response_format)
    except ToolRequestError as exc:
        raise InvalidRequestError(exc.message, exc.param) from None


def plan_messages(rt: Runtime, messages: list[dict[str, Any]]) -> ChatPlan:
    """The plan of a conversation with no tools and no response_format (what /tokenize renders):
    the messages as the tool format hands them to the template, as a chat request would."""
    try:
        return plan_chat(rt.tool_format, messages)
    except ToolRequestError as exc:
        raise InvalidRequestError(exc.message, exc.param) from None


def template_prompt_ids(rt: Runtime, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                        extra: dict[str, Any] | None = None, *, add_generation_prompt: bool = True,
                        add_special_tokens: bool = False, param: str | None = "messages") -> list[int]:
    """Render the chat template over request data and tokenize it, request strings kept literal.
    With `param`, a prompt that cannot fit the context is refused before it is tokenized."""
    literals = rt.tokenizer.literals()
    text = rt.template.render_request(messages, tools, add_generation_prompt, extra, literals.hide)
    if param is not None:
        rt.check_fits(literals.restored_length(text), param)
    return rt.tokenizer.encode_prompt(text, literals, add_special_tokens=add_special_tokens)


def prompt_ids(plan: ChatPlan, rt: Runtime, extra: dict[str, Any] | None) -> list[int]:
    """The prompt token ids of one planned request (on the calling thread)."""
    return template_prompt_ids(rt, plan.messages, plan.tools, extra)


def prepare_turn(turn: TurnRequest, params: SamplingParams, rt: Runtime,
                 session=None) -> tuple[ChatPlan, list[int], SamplingParams]:
    """One turn's preparation, for a prep thread (`Runtime.offload`): its plan, the first engine
    request's prompt ids and its constrained sampling params (the grammar compiled). In a
    session (a SessionTurn), the prompt is rendered after the session's data."""
    plan = plan_turn(turn, rt)
    if session is not None:
        if params.n != 1:
            raise InvalidRequestError("A session turn has one choice: 'n' must be 1.", "n")
        ids = session.prompt(plan, rt, turn.template_kwargs)
    else:
        ids = prompt_ids(plan, rt, turn.template_kwargs)
    return plan, ids, constrained(plan, params, rt)


def prepare_chat(req: ChatCompletionRequest, params: SamplingParams, rt: Runtime,
                 config: ServerConfig, session=None) -> tuple[ChatPlan, list[int], SamplingParams]:
    """A chat completion request's preparation (`prepare_turn` of its `TurnRequest`)."""
    return prepare_turn(chat_turn_request(req, config), params, rt, session)


def constrained(plan: ChatPlan, params: SamplingParams, rt: Runtime) -> SamplingParams:
    """The request's sampling params adapted to a plan: its grammar, special tokens kept for
    parsers that need them, greedy routing, and no user stop strings inside routing markup."""
    changes: dict[str, Any] = {}
    if plan.constraint is not None:
        try:
            changes["logits_mask_factory"] = rt.grammars.compile(plan.constraint)
        except GrammarError as exc:
            raise InvalidRequestError(f"The tools or response_format cannot be compiled to a grammar: {exc}",
                                      "response_format" if plan.format is None else "tools") from None
    if plan.keep_special_tokens:
        changes["skip_special_tokens"] = False
    if plan.greedy:
        changes["temperature"] = 0.0
    if plan.routes_only:
        changes["stop"] = []
        changes["logprobs"] = None
    return replace(params, **changes) if changes else params
