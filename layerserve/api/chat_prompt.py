"""A chat request -> prompt token ids: check what we cannot honour, then render the model's template.

The prompt is `tokenizer.encode(template.render(messages, tools), add_special_tokens=False)`:
the template itself writes BOS where the model wants one.
"""

from __future__ import annotations

from typing import Any

from layerserve.api.errors import InvalidRequestError, NotSupportedError
from layerserve.api.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    CustomTool,
    FunctionMessage,
    NamedCustomToolChoice,
    NamedToolChoice,
    AllowedToolsChoice,
    RefusalPart,
    TextPart,
    ToolMessage,
)
from layerserve.api.state import Runtime
from layerserve.config import ServerConfig

# Request fields this server cannot honour: rejected when set (to anything but these values).
_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None,),
    "function_call": (None,),
    "moderation": (None,),
    "verbosity": (None,),
    "reasoning_effort": (None, "none"),
    "store": (None, False),
}
_WHY = {
    "functions": "it is deprecated; use 'tools'",
    "function_call": "it is deprecated; use 'tool_choice'",
    "store": "this server does not store completions",
    "reasoning_effort": "this model does not reason before answering",
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


def template_tools(req: ChatCompletionRequest, config: ServerConfig) -> list[dict[str, Any]] | None:
    """Tool schemas for the template (None when there are none, or tool_choice is 'none')."""
    choice = req.tool_choice
    if not req.tools:
        if req.tools is not None:
            raise InvalidRequestError("Invalid 'tools': empty array. Expected an array with at least one tool.", "tools")
        if choice is not None and choice != "none":
            raise InvalidRequestError("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        if req.parallel_tool_calls is not None:
            raise InvalidRequestError("'parallel_tool_calls' is only allowed when 'tools' are specified.",
                                      "parallel_tool_calls")
        return None
    if len(req.tools) > config.max_tools:
        raise InvalidRequestError(f"Too many tools: {len(req.tools)} (the limit is {config.max_tools}).", "tools")
    names = set()
    for i, tool in enumerate(req.tools):
        if isinstance(tool, CustomTool):
            raise NotSupportedError("Custom tools are not supported; use function tools.", f"tools[{i}]")
        names.add(tool.function.name)
    if isinstance(choice, NamedCustomToolChoice):
        raise NotSupportedError("Custom tools are not supported; use function tools.", "tool_choice")
    wanted = []
    if isinstance(choice, NamedToolChoice):
        wanted = [choice.function.name]
    elif isinstance(choice, AllowedToolsChoice):
        wanted = [str((t.get("function") or {}).get("name")) for t in choice.allowed_tools.tools]
    for name in wanted:
        if name not in names:
            raise InvalidRequestError(f"Invalid 'tool_choice': no function named {name!r} in 'tools'.", "tool_choice")
    if choice == "none":
        return None
    return [tool.model_dump(exclude_none=True, by_alias=True) for tool in req.tools]


async def chat_prompt_ids(req: ChatCompletionRequest, rt: Runtime, config: ServerConfig) -> list[int]:
    check_unsupported(req)
    messages = template_messages(req.messages, config)
    tools = template_tools(req, config)
    extra = req.chat_template_kwargs or {}
    clash = _TEMPLATE_RESERVED.intersection(extra)
    if clash:
        raise InvalidRequestError(f"'chat_template_kwargs' may not set {sorted(clash)}.", "chat_template_kwargs")
    text = rt.template.render(messages, tools=tools, add_generation_prompt=True, **extra)
    return await rt.encode(text, add_special_tokens=False, param="messages")
