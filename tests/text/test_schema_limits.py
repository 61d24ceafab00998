"""Depth and size limits on JSON schemas (tool parameters, response_format): refused with a clear
message before anything recurses into them, at any depth, with bounded work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from layerserve.text.tool_parsers.schema import (
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_NODES,
    json_schema_rule,
    schema_error,
    schema_limit_error,
)
from layerserve.text.tools import ToolRequestError, parse_tools, response_format_rule

LEAF: dict[str, Any] = {"type": "string"}

# One level of nesting per keyword that holds subschemas: each wraps `inner` one level deeper.
WRAPPERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "properties": lambda inner: {"type": "object", "properties": {"a": inner}},
    "items": lambda inner: {"type": "array", "items": inner},
    "prefixItems": lambda inner: {"type": "array", "prefixItems": [inner]},
    "anyOf": lambda inner: {"anyOf": [inner, {"type": "null"}]},
    "oneOf": lambda inner: {"oneOf": [inner]},
    "allOf": lambda inner: {"allOf": [inner]},
    "not": lambda inner: {"not": inner},
    "additionalProperties": lambda inner: {"type": "object", "additionalProperties": inner},
    "patternProperties": lambda inner: {"type": "object", "patternProperties": {"^x": inner}},
    "$defs": lambda inner: {"$defs": {"d": inner}, "type": "object"},
    "if/then": lambda inner: {"if": {"type": "object"}, "then": inner},
}


def nested(levels: int, wrap: Callable[[Any], dict[str, Any]] = WRAPPERS["properties"], leaf: Any = LEAF) -> Any:
    """A schema `levels` deep: `levels - 1` wrappers around `leaf` (built in a loop, not recursion)."""
    schema = leaf
    for _ in range(levels - 1):
        schema = wrap(schema)
    return schema


def nested_data(containers: int) -> Any:
    """JSON data of `containers` arrays and objects, each inside the previous."""
    data: Any = "x"
    for i in range(containers):
        data = {"k": data} if i % 2 else [data]
    return data


@pytest.mark.parametrize("keyword", WRAPPERS)
def test_depth_limit_is_exact_for_every_subschema_keyword(keyword: str) -> None:
    wrap = WRAPPERS[keyword]
    assert schema_limit_error(nested(MAX_SCHEMA_DEPTH, wrap)) is None
    error = schema_limit_error(nested(MAX_SCHEMA_DEPTH + 1, wrap))
    assert error is not None and "nested too deeply" in error and str(MAX_SCHEMA_DEPTH) in error


def test_schema_at_the_depth_limit_compiles() -> None:
    """The limit leaves room for the grammar engine: the deepest accepted schemas compile."""
    for keyword in ("properties", "items", "anyOf"):
        schema = nested(MAX_SCHEMA_DEPTH, WRAPPERS[keyword])
        assert schema_error(schema) is None, keyword
        assert json_schema_rule(schema).startswith("%json ")


@pytest.mark.parametrize("keyword", ["properties", "items", "anyOf", "not"])
def test_ten_thousand_levels_are_refused_without_recursion(keyword: str) -> None:
    schema = nested(10_000, WRAPPERS[keyword])
    error = schema_error(schema)  # a RecursionError would fail the test
    assert error is not None and "nested too deeply" in error


class CountingDict(dict):
    """A dict that counts how often the walk lists its items."""

    expanded = 0

    def items(self):  # type: ignore[override]
        CountingDict.expanded += 1
        return super().items()


def test_refusal_stops_at_the_limit_instead_of_walking_everything() -> None:
    schema: Any = CountingDict(LEAF)
    for _ in range(100_000):
        schema = CountingDict({"type": "array", "items": schema})
    CountingDict.expanded = 0
    assert "nested too deeply" in schema_limit_error(schema)
    assert CountingDict.expanded == MAX_SCHEMA_DEPTH  # levels 1..32 listed; level 33 refused on sight


def test_data_inside_keywords_counts_as_nesting() -> None:
    """`const` / `enum` / `default` / unknown keywords carry arbitrary JSON: a 10,000-deep value
    under a flat schema is refused too, while a flat enum on the deepest schema is fine."""
    for keyword in ("const", "default", "examples", "x-vendor"):
        error = schema_error({"type": "object", keyword: nested_data(10_000)})
        assert error is not None and "nested too deeply" in error, keyword
    # a keyword's value sits at its schema's level (1 here): 32 containers fit, 33 do not
    assert schema_limit_error({"type": "object", "default": nested_data(MAX_SCHEMA_DEPTH)}) is None
    assert "nested too deeply" in schema_limit_error({"type": "object", "default": nested_data(MAX_SCHEMA_DEPTH + 1)})
    deepest_enum = nested(MAX_SCHEMA_DEPTH, leaf={"type": "string", "enum": ["a", "b"]})
    assert schema_error(deepest_enum) is None


def test_node_limit_is_exact() -> None:
    # nodes: the schema object, "string", the enum list, and its values
    fits = {"type": "string", "enum": [f"v{i}" for i in range(MAX_SCHEMA_NODES - 3)]}
    assert schema_limit_error(fits) is None
    too_many = {"type": "string", "enum": [f"v{i}" for i in range(MAX_SCHEMA_NODES - 2)]}
    error = schema_limit_error(too_many)
    assert error is not None and "too large" in error and str(MAX_SCHEMA_NODES) in error


def test_wide_shallow_schema_is_refused_as_too_large() -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_SCHEMA_NODES)}}
    assert "too large" in schema_error(wide)
    variants = {"anyOf": [{"type": "object", "properties": {"k": {"const": i}}} for i in range(MAX_SCHEMA_NODES // 4)]}
    assert "too large" in schema_error(variants)


def test_ordinary_schemas_are_untouched() -> None:
    linked_list = {
        "$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"},
                                                             "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}}},
        "$ref": "#/$defs/node",
    }
    weather = {"type": "object", "properties": {"location": {"type": "string"},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["location"]}
    for schema in (linked_list, weather, True, {}):
        assert schema_limit_error(schema) is None
        assert schema_error(schema) is None
    assert "too deeply" not in (schema_error({"type": 3}) or "")  # other errors still come from the grammar engine


def test_tools_and_response_format_turn_limits_into_400s_with_param() -> None:
    deep = nested(MAX_SCHEMA_DEPTH + 1)
    tools = [{"type": "function", "function": {"name": "ok", "parameters": nested(3)}},
             {"type": "function", "function": {"name": "deep", "parameters": deep}}]
    with pytest.raises(ToolRequestError) as tool_error:
        parse_tools(tools)
    assert tool_error.value.param == "tools[1].function.parameters"
    assert "'deep'" in tool_error.value.message and "nested too deeply" in tool_error.value.message

    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": nested(10_000, WRAPPERS["items"])}}
    with pytest.raises(ToolRequestError) as format_error:
        response_format_rule(response_format)
    assert format_error.value.param == "response_format"
    assert "nested too deeply" in format_error.value.message
