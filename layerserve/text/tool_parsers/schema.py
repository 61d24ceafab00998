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

# Limits on one schema, checked before anything recurses into it (close_objects, json.dumps and the
# grammar compiler all recurse; a request can nest a schema 10,000 deep within the body limit).
# Depth: the root schema is level 1, each subschema (a property, `items`, an `anyOf` member, ...)
# is one level below the schema holding it, and inside other keywords' values (`enum`, `const`,
# `default`, unknown keywords) each nested array or object is one level more. Real tool schemas
# stay under 10 levels; 32 keeps the compiled JSON document well inside llguidance's own parser
# depth limit (about 128 JSON levels; a schema level is at most 2). Nodes: every JSON value in
# the schema (objects, arrays, strings, numbers, ...); the slowest 10,000-node shape we measured
# (3,300 flat properties) validates in ~0.3 s on one core, typical shapes in ~0.1 s.
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 10_000

_SUBSCHEMA = frozenset({
    "items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else",
    "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema",
})  # one subschema (`items` may also be a list of them, draft 4's tuples)
_SUBSCHEMA_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SUBSCHEMA_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


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
    too_big = schema_limit_error(schema)
    if too_big is not None:
        return too_big
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


def schema_limit_error(schema: Any) -> str | None:
    """Why `schema` is too deep or too large (see MAX_SCHEMA_DEPTH, MAX_SCHEMA_NODES), or None.
    Iterative, and stops at the first limit crossed, so any parsed JSON is judged in bounded time."""
    stack: list[tuple[Any, int, bool]] = [(schema, 1, True)]  # (value, level, stands where a schema goes)
    nodes = 0
    while stack:
        value, level, is_schema = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            return f"the schema is too large (more than {MAX_SCHEMA_NODES} values)"
        if not isinstance(value, (dict, list)):
            continue
        if level > MAX_SCHEMA_DEPTH:
            return (f"the schema is nested too deeply (more than {MAX_SCHEMA_DEPTH} levels of nested schemas, "
                    "arrays or objects)")
        if not (is_schema and isinstance(value, dict)):  # data: each nested array or object is a level
            stack.extend((item, level + 1, False) for item in (value if isinstance(value, list) else value.values()))
            continue
        for key, item in value.items():
            if key in _SUBSCHEMA_LIST and isinstance(item, list) or key in _SUBSCHEMA_MAP and isinstance(item, dict):
                nodes += 1  # the list or map holding the subschemas
                stack.extend((sub, level + 1, True) for sub in (item if isinstance(item, list) else item.values()))
            elif key in _SUBSCHEMA:
                stack.append((item, level + 1, True))
            else:  # `enum`, `const`, `required`, ...: a container here is at the schema's own level
                stack.append((item, level, False))
    return None
