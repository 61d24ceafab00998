"""Request bodies of LayerScale's session routes (`/v1/sessions*`), as its client sends them.

An unknown field is a 400 naming it, as on every route of ours."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from layerserve.api.protocol import ReasoningEffort
MAX_STOP = 4
MAX_STOP_BYTES = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionCreateRequest(_Body):
    id: StrictStr | None = None
    window: Annotated[StrictInt, Field(ge=16)] | None = None
    pre_decode: StrictBool = False


class PushRequest(_Body):
    data: StrictStr | Annotated[list[StrictStr], Field(min_length=1)]

    def entries(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)


class GenerateRequest(_Body):
    prompt: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] = 0.6
    top_p: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1)] = 0.9
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    fast_answer: list[StrictStr] = Field(default_factory=list)
    gap_threshold: StrictFloat | StrictInt = 2.0
    reasoning_effort: ReasoningEffort | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    stream: StrictBool = False

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class FlashRequest(_Body):
    query: StrictStr
    max_tokens: StrictInt = 64  # clamped to 1..256, never refused
