"""Pydantic models of the Anthropic Messages requests this server accepts (POST /v1/messages and
/v1/messages/count_tokens).

As in protocol.py, models are strict and forbid unknown fields: a field we do not know is a 400
naming it. Blocks this model cannot read (images, documents) are recognised only to be refused by
name (see messages_turn.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from layerserve.api.protocol import INT64_MAX, INT64_MIN, FunctionName, Loose, Strict, refuse_body_session_id


class CacheControl(Strict):
    """A caching hint; the prefix cache here is automatic, so it changes nothing."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1)]
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1)]
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class ImageBlock(Loose):
    type: Literal["image"]


class DocumentBlock(Loose):
    type: Literal["document"]


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ImageBlock | DocumentBlock,
                  Field(discriminator="type")]


class MessageParam(Strict):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], Field(min_length=1)]


class ToolParam(Strict):
    name: FunctionName
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None


class ToolChoiceAuto(Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(Strict):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class Thinking(BaseModel):
    """Parsed loosely so that any `thinking` setting but "disabled" is refused with a clear reason."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class JsonOutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    effort: str | None = None  # refused when set: this model has no effort levels
    format: JsonOutputFormat | None = None


class Metadata(Strict):
    user_id: str | None = None


class PromptFields(Strict):
    """What decides the prompt: shared by /v1/messages and /v1/messages/count_tokens."""

    model: str | None = None  # optional: absent, the response names the server's model
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None  # automatic caching; the prefix cache here always is


class MessagesRequest(PromptFields):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    stream: bool | None = None
    # Extensions (as on chat completions).
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    ignore_eos: bool | None = None
    session_id: Any = None  # refused: a session turn is bound by the x-layerscale-session-id header

    @field_validator("session_id", mode="before")
    @classmethod
    def _no_session_id(cls, value: Any) -> Any:
        return refuse_body_session_id(value)


class CountTokensRequest(PromptFields):
    pass
