"""Schemas derived from the `anthropic` SDK's own pydantic types, with extra fields forbidden.

The SDK's models allow unknown fields (and build responses without validating them), so a
response could carry a misspelt field and still "parse". `strict_validate` validates in
pydantic's strict mode (no "1" for 1) and then walks the result: any field the SDK's type does
not declare, at any depth, fails the test.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse

_ADAPTERS: dict[Any, pydantic.TypeAdapter] = {}


def _no_extra(value: Any, path: str) -> None:
    if isinstance(value, pydantic.BaseModel):
        extra = value.model_extra or {}
        assert not extra, f"{path}: fields the SDK does not declare: {sorted(extra)}"
        for name in type(value).model_fields:
            _no_extra(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _no_extra(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_extra(item, f"{path}.{key}")


def strict_validate(data: Any, type_: Any) -> Any:
    """`data` as `type_` (an SDK model or union), or an AssertionError naming what is wrong."""
    adapter = _ADAPTERS.get(type_)
    if adapter is None:
        adapter = _ADAPTERS[type_] = pydantic.TypeAdapter(type_)
    try:
        value = adapter.validate_python(data, strict=True)
    except pydantic.ValidationError as exc:
        raise AssertionError(f"not a valid {type_}: {exc}\n{json.dumps(data)[:2000]}") from None
    _no_extra(value, "$")
    return value


def message(data: dict[str, Any]) -> Message:
    return strict_validate(data, Message)


def stream_event(data: dict[str, Any]) -> Any:
    return strict_validate(data, RawMessageStreamEvent)


def error_response(data: dict[str, Any]) -> ErrorResponse:
    return strict_validate(data, ErrorResponse)


def tokens_count(data: dict[str, Any]) -> MessageTokensCount:
    return strict_validate(data, MessageTokensCount)
