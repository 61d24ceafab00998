"""An Anthropic Messages request -> the same `TurnRequest` and `SamplingParams` chat completions use.

The translation, block by block:

    system (string or text blocks)   -> a "system" message
    user text blocks                 -> a "user" message (blocks joined by newlines)
    user tool_result blocks          -> "tool" messages answering `tool_use_id`, before the user text
    assistant text blocks            -> the assistant message's content
    assistant tool_use blocks        -> its `tool_calls` (input as JSON arguments)
    tools (input_schema)             -> function tools (parameters)
    tool_choice auto/any/tool/none   -> "auto" / "required" / the named function / "none";
    disable_parallel_tool_use        -> parallel_tool_calls = False
    output_config.format             -> a json_schema response_format

Everything after that (planning, the template, grammars, tool-call parsing) is chat's.
"""

from __future__ import annotations

import json
from typing import Any

from layerserve.api.anthropic_protocol import (
    DocumentBlock,
    ImageBlock,
    MessageParam,
    MessagesRequest,
    PromptFields,
    TextBlock,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from layerserve.api.chat_prompt import TurnRequest
from layerserve.api.errors import InvalidRequestError, NotSupportedError
from layerserve.api.sampling import stop_strings
from layerserve.config import ServerConfig
from layerserve.engine.request import SamplingParams


def _texts(blocks: list[TextBlock]) -> str:
    return "\n".join(block.text for block in blocks)


def _tool_result(block: ToolResultBlock) -> dict[str, Any]:
    content = block.content
    text = _texts(content) if isinstance(content, list) else (content or "")
    if block.is_error:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}


def _call(block: ToolUseBlock) -> dict[str, Any]:
    return {"id": block.id, "type": "function",
            "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}}


def _message(i: int, msg: MessageParam, call_ids: set[str]) -> list[dict[str, Any]]:
    """One Anthropic message as template messages (a user message with tool results is several).
    `call_ids`: the tool_use ids of the messages before it (this one's are added)."""
    if isinstance(msg.content, str):
        return [{"role": msg.role, "content": msg.content}]
    texts: list[TextBlock] = []
    results: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(msg.content):
        where = f"messages.{i}.content.{j}"
        if isinstance(block, (ImageBlock, DocumentBlock)):
            raise NotSupportedError(f"{where}: content blocks of type '{block.type}' are not supported: this "
                                    f"model reads text only.", where)
        if isinstance(block, TextBlock):
            texts.append(block)
        elif isinstance(block, ToolUseBlock):
            if msg.role != "assistant":
                raise InvalidRequestError(f"{where}: 'tool_use' blocks belong in assistant messages.", where)
            calls.append(_call(block))
            call_ids.add(block.id)
        elif isinstance(block, ToolResultBlock):
            if msg.role != "user":
                raise InvalidRequestError(f"{where}: 'tool_result' blocks belong in user messages.", where)
            if block.tool_use_id not in call_ids:
                raise InvalidRequestError(f"{where}.tool_use_id: no earlier 'tool_use' block has the id "
                                          f"{block.tool_use_id!r}.", f"{where}.tool_use_id")
            results.append(_tool_result(block))
    if msg.role == "assistant":
        item: dict[str, Any] = {"role": "assistant", "content": _texts(texts)}
        if calls:
            item["tool_calls"] = calls
        return [item]
    return results + ([{"role": "user", "content": _texts(texts)}] if texts or not results else [])


def _tool_choice(req: PromptFields) -> tuple[str | dict[str, Any] | None, bool | None]:
    choice = req.tool_choice
    if choice is None:
        return None, None
    parallel = False if getattr(choice, "disable_parallel_tool_use", None) else None
    if isinstance(choice, ToolChoiceAuto):
        return "auto", parallel
    if isinstance(choice, ToolChoiceAny):
        return "required", parallel
    if isinstance(choice, ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}, parallel
    assert isinstance(choice, ToolChoiceNone)
    return "none", None


def check_thinking(req: PromptFields) -> None:
    if req.thinking is not None and req.thinking.type != "disabled":
        raise InvalidRequestError(f"'thinking' of type '{req.thinking.type}' is not supported: this model does not "
                                  f"reason before answering. Omit 'thinking' or set it to {{\"type\": \"disabled\"}}.",
                                  "thinking")


def _response_format(req: PromptFields) -> dict[str, Any] | None:
    """`output_config.format` (structured outputs) as chat's json_schema response_format."""
    config = req.output_config
    if config is None:
        return None
    if config.effort is not None:
        raise NotSupportedError("'output_config.effort' is not supported: this model has no effort levels.",
                                "output_config.effort")
    if config.format is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": config.format.schema_}}


def messages_turn_request(req: PromptFields, config: ServerConfig) -> TurnRequest:
    """The `TurnRequest` of a Messages (or count_tokens) request; every problem is a 400."""
    check_thinking(req)
    if len(req.messages) > config.max_messages:
        raise InvalidRequestError(f"Too many messages: {len(req.messages)} (the limit is {config.max_messages}).",
                                  "messages")
    messages: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else _texts(req.system)
        messages.append({"role": "system", "content": system})
    if req.messages[-1].role == "assistant":
        # Anthropic continues a final assistant message ("prefill"); the chat templates here can only
        # open a new turn, which would answer something else: refused rather than done differently.
        where = f"messages.{len(req.messages) - 1}.role"
        raise NotSupportedError(f"{where}: a final assistant message (prefill) is not supported; end with a user "
                                f"message.", where)
    call_ids: set[str] = set()
    for i, msg in enumerate(req.messages):
        messages += _message(i, msg, call_ids)
    tools = None
    if req.tools is not None:
        if not req.tools:
            raise InvalidRequestError("'tools' is empty: give at least one tool, or leave it out.", "tools")
        if len(req.tools) > config.max_tools:
            raise InvalidRequestError(f"Too many tools: {len(req.tools)} (the limit is {config.max_tools}).", "tools")
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": t.input_schema}} for t in req.tools]
        for tool in tools:
            if tool["function"]["description"] is None:
                del tool["function"]["description"]
    choice, parallel = _tool_choice(req)
    if tools is None and choice not in (None, "none"):
        raise InvalidRequestError("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
    return TurnRequest(messages, tools, choice, parallel if tools else None, _response_format(req))


def messages_sampling(req: MessagesRequest) -> SamplingParams:
    """Anthropic's sampling fields as engine params (its defaults: temperature 1, no top-p/top-k cut)."""
    return SamplingParams(
        max_tokens=req.max_tokens,
        temperature=req.temperature if req.temperature is not None else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=stop_strings(req.stop_sequences),
        ignore_eos=bool(req.ignore_eos),
    )
