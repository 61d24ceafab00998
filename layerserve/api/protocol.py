"""Pydantic models of the OpenAI requests this server accepts (the only place pydantic lives).

Models are strict (no "1" for 1) and forbid unknown fields, so a field we do not know is a 400,
never silently dropped. Fields that OpenAI defines but this server cannot honour are declared
here and rejected with a clear message by the handlers (see `chat.check_unsupported`).
Responses are plain dicts built in chat.py / completions.py (cheaper per SSE chunk) and are
checked against OpenAI's schema in the tests.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from layerserve.api.errors import InvalidRequestError, validation_message

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class Loose(BaseModel):
    """Parts we only recognise in order to reject them by name (image_url, audio, ...)."""

    model_config = ConfigDict(extra="allow")


# ---- messages ---------------------------------------------------------------------------------
class TextPart(Strict):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a caching hint; our prefix cache is automatic


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: str


class ImagePart(Loose):
    type: Literal["image_url"]


class AudioPart(Loose):
    type: Literal["input_audio"]


class FilePart(Loose):
    type: Literal["file"]


ContentPart = Annotated[TextPart | RefusalPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
Content = str | Annotated[list[ContentPart], Field(min_length=1)]


class SystemMessage(Strict):
    role: Literal["system"]
    content: Content
    name: str | None = None


class DeveloperMessage(Strict):
    role: Literal["developer"]
    content: Content
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Content | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: dict[str, Any] | None = None  # deprecated; rejected
    audio: dict[str, Any] | None = None  # rejected


class ToolMessage(Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


class FunctionMessage(Strict):
    """Deprecated `function` role; parsed so it can be rejected by name."""

    role: Literal["function"]
    content: str | None = None
    name: str


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


# ---- tools and response formats ---------------------------------------------------------------
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class CustomTool(Loose):
    type: Literal["custom"]


Tool = Annotated[FunctionTool | CustomTool, Field(discriminator="type")]


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(Strict):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class AllowedToolsChoice(Strict):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class NamedCustomToolChoice(Loose):
    type: Literal["custom"]


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[NamedToolChoice | AllowedToolsChoice | NamedCustomToolChoice, Field(discriminator="type")]
)


class TextFormat(Strict):
    type: Literal["text"]


class JsonSchemaSpec(Strict):
    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


ResponseFormat = Annotated[TextFormat | JsonSchemaFormat | JsonObjectFormat, Field(discriminator="type")]


class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


# ---- sampling fields shared by both endpoints -------------------------------------------------
Stop = str | Annotated[list[str], Field(max_length=4)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingFields(Strict):
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Common extensions (vLLM / llama.cpp names).
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None


# The header a LayerScale session turn is bound by; a `session_id` in the body is refused, naming it.
SESSION_HEADER = "x-layerscale-session-id"


def refuse_body_session_id(value: Any) -> Any:
    """The `session_id` body field's validator: null means no session, anything else is a 400."""
    if value is not None:
        raise PydanticCustomError("session_id_in_body",
                                  f"'session_id' is not read from the request body; send it as the "
                                  f"'{SESSION_HEADER}' header")
    return value


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ChatCompletionRequest(SamplingFields):
    model: str | None = None  # optional: the response names the server's model whatever is sent
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Accepted: identifiers and caching hints that change nothing about the answer.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # Declared so that they are rejected by name (see chat.check_unsupported).
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extension: extra variables for the template
    # Reasoning controls (OpenAI's reasoning_effort; LayerScale's three booleans). Accepted on every model;
    # they change nothing on one without a reasoning mode.
    reasoning_effort: ReasoningEffort | None = None
    include_reasoning: bool | None = None
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None
    session_id: Any = None  # refused: a session turn is bound by the SESSION_HEADER header

    @field_validator("session_id", mode="before")
    @classmethod
    def _no_session_id(cls, value: Any) -> Any:
        return refuse_body_session_id(value)

    @field_validator("chat_template_kwargs", mode="after")
    @classmethod
    def _default_generation_prompt(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """`add_generation_prompt: true` is what every chat request renders anyway (LayerScale's client
        may send it); any other value stays, for chat_prompt to refuse."""
        if value is not None and value.get("add_generation_prompt") is True:
            value = {k: v for k, v in value.items() if k != "add_generation_prompt"}
        return value


TokenIds = list[Annotated[int, Field(ge=0)]]
Prompt = str | list[str] | TokenIds | list[Annotated[TokenIds, Field(min_length=1)]]


class CompletionRequest(SamplingFields):
    prompt: Prompt | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=0)] | None = None


# ---- vLLM's tokenizer endpoints ---------------------------------------------------------------
class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: TokenIds


# ---- parsing ----------------------------------------------------------------------------------
M = TypeVar("M", bound=BaseModel)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_unicode(value: Any) -> None:
    """Raise UnicodeEncodeError on a string holding an unpaired surrogate ("\\ud800" is valid
    JSON, but not text: the tokenizer cannot take it)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


def parse_json(body: bytes) -> Any:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
        if _SURROGATE_ESCAPE.search(body):  # rare: only then walk the whole document
            _check_unicode(data)
        return data
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeErrors are ValueErrors
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object of "
            f"valid Unicode text.",
            code="invalid_json",
        ) from None


def parse_request(model: type[M], body: bytes) -> M:
    """Body bytes -> a validated request, or InvalidRequestError naming the first bad field."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors(include_url=False), data)
        raise InvalidRequestError(message, param) from None
