"""JSON schemas as pieces of Lark grammars (llguidance's `%json {...}`), for tool arguments and
response formats alike."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

# Compact JSON with the separators of Python's json.dumps: a small model cannot drift into
# endless whitespace, and what it writes re-renders byte-identically into the next prompt.
# Lenient: keywords and string formats the engine does not implement are ignored, not refused
# (real tool schemas carry plenty); malformed schemas are still errors.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}

EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


def json_schema_rule(schema: dict[str, Any] | bool) -> str:
    """A Lark expression (`%json {...}`) for one JSON value valid under `schema`, written in
    JSON_STYLE, with objects closed (see `close_objects`)."""
    closed = close_objects(schema)
    if isinstance(closed, dict):
        closed = {**closed, "x-guidance": JSON_STYLE}
    elif closed is True:
        closed = {"x-guidance": JSON_STYLE}
    return "%json " + json.dumps(closed)


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that lists `properties` but says nothing of
    extra ones (`additionalProperties`, `patternProperties`, `unevaluatedProperties`) gets
    `additionalProperties: false`. Every output valid under the copy is valid under the original;
    small models stay on the listed properties instead of inventing more."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
            out[key] = {k: close_objects(v) for k, v in value.items()} if isinstance(value, dict) else value
        elif key in ("const", "enum", "default", "examples"):
            out[key] = copy.deepcopy(value)
        else:
            out[key] = close_objects(value)
    if (
        isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and "patternProperties" not in out
        and "unevaluatedProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def call_object_schema(tools: list[Any], name_key: str = "name", args_key: str = "arguments") -> dict[str, Any]:
    """Schema of one `{"name": ..., "arguments": {...}}` object calling any of `tools`
    (ToolSpec), name first, each tool's arguments under its own parameters schema."""
    variants = [
        {
            "type": "object",
            "properties": {name_key: {"const": t.name}, args_key: t.parameters},
            "required": [name_key, args_key],
        }
        for t in tools
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def schema_error(schema: Any) -> str | None:
    """Why `schema` cannot constrain output (invalid, or using what the grammar engine does not
    support), or None when it can."""
    import llguidance  # the grammar engine is the judge of what it can compile

    if not isinstance(schema, (dict, bool)):
        return "a JSON schema must be an object"
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark("start: " + json_schema_rule(schema))
    except ValueError as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return None
    first = (messages[0] if messages else "invalid schema").strip().splitlines()[0]
    return _POSITION.sub("", first)  # "at 1(8): " points into our grammar, not the user's schema


_POSITION = re.compile(r"^at \d+\(\d+\): ")
