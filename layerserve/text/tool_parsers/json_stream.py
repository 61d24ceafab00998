"""Incremental scanners for the JSON inside tool calls, fed text as it streams.

`JsonObjectScanner` finds where one JSON object ends. `CallObjectScanner` walks a call object
such as `{"name": "get_weather", "arguments": {"location": "Tokyo"}}` and hands out the raw text
of the arguments value as it arrives, so argument fragments stream before the call is complete.
Both only track nesting and strings; they do not validate (the grammar already did).
"""

from __future__ import annotations

import json
from collections.abc import Collection

_WS = " \t\r\n"


class JsonObjectScanner:
    """Finds the end of one JSON object (leading whitespace skipped, not part of it)."""

    __slots__ = ("_depth", "_in_str", "_esc", "started", "done")

    def __init__(self) -> None:
        self._depth = 0
        self._in_str = False
        self._esc = False
        self.started = False  # the opening brace was seen
        self.done = False

    def feed(self, text: str) -> tuple[int, int]:
        """(index in `text` where the object starts or 0, chars consumed). Consumption stops
        right after the closing brace; `done` is then True."""
        start = 0
        for i, c in enumerate(text):
            if not self.started:
                if c in _WS:
                    start = i + 1
                    continue
                self.started = True
                start = i
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
            elif c == '"':
                self._in_str = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return start, i + 1
        return start, len(text)


class CallObjectScanner:
    """Walks one `{"name": ..., <args key>: ...}` object; tolerant of key order and extra keys.

    `feed` returns the raw argument text that arrived (for an object value: its characters as
    written, so the fragments concatenate to the arguments JSON). When the arguments value is a
    JSON string (some models encode them so), it is decoded and returned whole at the end.
    """

    def __init__(self, args_keys: Collection[str] = ("arguments", "parameters")) -> None:
        self._args_keys = frozenset(args_keys)
        self.name: str | None = None
        self.saw_arguments = False
        self.done = False
        self._state = "start"  # start, key_start, key, colon, value_start, value, after_value
        self._buf: list[str] = []  # the current key, or the current non-argument value
        self._key = ""
        self._kind = ""  # of the current value: "str", "container" or "scalar"
        self._depth = 0  # nesting inside the current value
        self._in_str = False
        self._esc = False

    def feed(self, text: str) -> tuple[int, str]:
        """(chars consumed, new argument text). Stops right after the object's closing brace."""
        args: list[str] = []
        i = 0
        n = len(text)
        while i < n and not self.done:
            c = text[i]
            state = self._state
            if state == "value":
                if self._value_char(c, args):
                    continue  # a scalar ended before c: handle c as after_value
            elif state == "start":
                if c == "{":
                    self._state = "key_start"
            elif state == "key_start":
                if c == '"':
                    self._state, self._buf, self._esc = "key", [], False
                elif c == "}":
                    self.done = True
            elif state == "key":
                if self._esc:
                    self._esc = False
                    self._buf.append(c)
                elif c == "\\":
                    self._esc = True
                    self._buf.append(c)
                elif c == '"':
                    self._key = json.loads('"' + "".join(self._buf) + '"')
                    self._state = "colon"
                else:
                    self._buf.append(c)
            elif state == "colon":
                if c == ":":
                    self._state = "value_start"
            elif state == "value_start":
                if c not in _WS:
                    self._begin_value(c, args)
            elif state == "after_value":
                if c == ",":
                    self._state = "key_start"
                elif c == "}":
                    self.done = True
            i += 1
        return i, "".join(args)

    @property
    def _in_args(self) -> bool:
        return self._key in self._args_keys

    def _begin_value(self, c: str, args: list[str]) -> None:
        self._state, self._buf, self._depth, self._in_str, self._esc = "value", [c], 0, False, False
        if self._in_args:
            self.saw_arguments = True
        if c == '"':
            self._kind, self._in_str = "str", True
        elif c in "{[":
            self._kind, self._depth = "container", 1
            if self._in_args:
                args.append(c)
        else:
            self._kind = "scalar"

    def _value_char(self, c: str, args: list[str]) -> bool:
        """Consume c inside a value; True when a scalar ended before c (c not consumed)."""
        if self._kind == "scalar":
            if c in ",}" or c in _WS:
                self._end_value(args)
                return True
            self._buf.append(c)
            return False
        if self._kind == "container" and self._in_args:
            args.append(c)
        else:
            self._buf.append(c)
        if self._in_str:
            if self._esc:
                self._esc = False
            elif c == "\\":
                self._esc = True
            elif c == '"':
                self._in_str = False
                if self._kind == "str":
                    self._end_value(args)
        elif c == '"':
            self._in_str = True
        elif c in "{[":
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._end_value(args)
        return False

    def _end_value(self, args: list[str]) -> None:
        raw = "".join(self._buf)
        if self._key == "name" and self._kind == "str":
            self.name = json.loads(raw)
        elif self._in_args and self._kind == "str":
            args.append(json.loads(raw))  # arguments sent as a JSON-encoded string
        elif self._in_args and self._kind == "scalar" and raw != "null":
            args.append(raw)
        self._state = "after_value"
