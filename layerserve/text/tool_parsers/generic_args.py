"""Arguments of the generic format as `key: value` lines, for tools whose parameters are flat.

    Tool: weather
    location: Tokyo
    unit: celsius

A small model copies a word from the user's message as the same token it read (" Tokyo"); inside
a JSON string it would have to spell it without the leading space ("To" + "kyo"), which SmolLM2-135M
gets wrong ("TOKITO"). So flat parameter schemas (strings, numbers, booleans, enums) are written
as lines and turned back into JSON text while they stream; other schemas are written as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_VALUE_CHARS = 500
_NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
_INTEGER = r"-?(0|[1-9][0-9]*)"


@dataclass(frozen=True, slots=True)
class LineParam:
    name: str
    quoted: bool  # a JSON string (written unquoted on its line) or a raw JSON literal
    required: bool
    schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LineArgs:
    """How one tool's arguments are written as lines (None from `of` when they cannot be)."""

    params: tuple[LineParam, ...]

    @classmethod
    def of(cls, schema: dict[str, Any]) -> LineArgs | None:
        props = schema.get("properties") or {}
        if set(schema) - {"type", "properties", "required", "additionalProperties", "description", "title", "$schema"}:
            return None
        if schema.get("additionalProperties") not in (None, False):
            return None
        required = set(schema.get("required") or [])
        if not required <= set(props):
            return None
        params = []
        for name, prop in props.items():
            quoted = _line_kind(prop)
            if quoted is None or not _is_key(name):
                return None
            params.append(LineParam(name, quoted, name in required, prop))
        params.sort(key=lambda p: not p.required)  # required lines first (stable)
        return cls(tuple(params))

    @property
    def required(self) -> list[str]:
        return [p.name for p in self.params if p.required]

    def grammar(self, word: Callable[[str], str]) -> tuple[str, str]:
        """Lark items for the lines after the tool word: (required lines, optional lines);
        `word` spells an enum value."""
        required, optional = [], []
        for p in self.params:
            item = f'"\\n{p.name}:" {_value_rule(p.schema, word)}'
            (required if p.required else optional).append(item if p.required else f"({item})?")
        return " ".join(required), " ".join(optional)

    def render(self, arguments: Any) -> str | None:
        """The lines for a call's arguments (history), or None when they do not fit lines."""
        if not isinstance(arguments, dict):
            return None
        known = {p.name: p for p in self.params}
        if not set(arguments) <= set(known):
            return None
        lines = []
        for p in self.params:
            if p.name not in arguments:
                continue
            value = arguments[p.name]
            if p.quoted:
                if not isinstance(value, str) or "\n" in value or "\r" in value or value[:1].isspace() or not value:
                    return None
                lines.append(f"\n{p.name}: {value}")
            else:
                lines.append(f"\n{p.name}: {json.dumps(value)}")
        return "".join(lines)


class LineArgsWriter:
    """Turns `key: value` lines, as they stream, into JSON text fragments of the arguments object
    (with json.dumps separators): `begin()`, then per line `key(name)` and `value(text)` pieces,
    then `end()`."""

    def __init__(self, args: LineArgs) -> None:
        self.params = {p.name: p for p in args.params}
        self._count = 0  # values begun
        self._param: LineParam | None = None  # the value being written
        self._lead = True  # its leading space is still to be skipped

    def begin(self) -> str:
        return "{"

    def key(self, name: str) -> str:
        out = self._end_value()
        if self._count:
            out += ", "
        self._count += 1
        self._param, self._lead = self.params[name], True
        return out + json.dumps(name) + ": " + ('"' if self._param.quoted else "")

    def value(self, text: str) -> str:
        if self._param is None:
            return ""
        if self._lead:
            text = text.lstrip(" ")
            self._lead = not text
        if not text:
            return ""
        return json.dumps(text, ensure_ascii=False)[1:-1] if self._param.quoted else text

    def end(self) -> str:
        return self._end_value() + "}"

    def _end_value(self) -> str:
        if self._param is None:
            return ""
        out = '"' if self._param.quoted else ""
        self._param = None
        return out


def _is_key(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-" for c in name)


def _line_kind(prop: Any) -> bool | None:
    """True: a string written bare; False: a JSON literal; None: not line material."""
    if not isinstance(prop, dict):
        return None
    extra = set(prop) - {"type", "description", "title", "enum", "const", "default", "examples"}
    if extra:
        return None
    values = prop.get("enum", [prop["const"]] if "const" in prop else None)
    if values is not None:
        if values and all(isinstance(v, str) and _is_word(v) for v in values):
            return True
        if values and all(isinstance(v, (int, float, bool)) for v in values):
            return False
        return None
    kind = prop.get("type")
    if kind == "string":
        return True
    if kind in ("integer", "number", "boolean"):
        return False
    return None


def _is_word(value: str) -> bool:
    return bool(value) and "\n" not in value and not value[0].isspace() and not value[-1].isspace()


def _value_rule(schema: dict[str, Any], word: Callable[[str], str]) -> str:
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values is not None:
        alts = [word(v) if isinstance(v, str) else json.dumps(" " + json.dumps(v)) for v in values]
        return "(" + " | ".join(alts) + ")"
    kind = schema.get("type")
    if kind == "string":
        # A leading space and a first character that is neither a space (the value's first
        # token is then the space-carrying word the model read) nor a quote (it is bare text).
        return f"/ [^\\s\"][^\\n\\r]{{0,{MAX_VALUE_CHARS - 1}}}/"
    if kind == "integer":
        return f"/ {_INTEGER}/"
    if kind == "number":
        return f"/ {_NUMBER}/"
    return '(" true" | " false")'
