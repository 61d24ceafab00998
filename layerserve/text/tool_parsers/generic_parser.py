"""The generic format's streaming parser (the format itself is in generic.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from layerserve.text.tool_parsers.base import ParsedDelta, ToolCall, ToolCallParser, expect_prefix, new_call_id
from layerserve.text.tool_parsers.generic_args import LineArgs, LineArgsWriter
from layerserve.text.tool_parsers.json_stream import JsonObjectScanner

TOPIC, TOOL, NONE = "Topic:", "Tool:", "none"


class GenericParser(ToolCallParser):
    """Reads `Topic: ...`, then calls (`Tool: <alias>` and argument lines or JSON), or
    `Tool: none` (`needs_answer`).

    The first call streams as it is written; later ones are held until complete and dropped
    when they repeat an earlier call exactly. Output not in this shape (no grammar was used) is
    passed through as content.
    """

    def __init__(self, forms: dict[str, tuple[str, LineArgs | None]], id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self._forms = forms  # alias -> (tool name, line form or None for JSON)
        self._buf = ""
        # head -> topic -> tool -> name -> (json | lines <-> value) -> next -> name ... ; text ; done
        self._state = "head"
        self._scanner = JsonObjectScanner()
        self._writer: LineArgsWriter | None = None
        self._held: tuple[str, list[str]] | None = None  # a later call being written: (name, argument text)

    def _end(self, out: ParsedDelta) -> None:
        if self._state == "name" and self._buf.strip() == NONE:
            self.needs_answer = True
        elif self._state == "name" and self._buf.strip() in self._forms:
            _, line_args = self._forms[self._buf.strip()]
            if line_args is not None and not line_args.required:  # a complete call without arguments
                self._open_call(out, self._buf.strip())
                self._close_call(out)
        elif self._state == "value":
            self._args(out, self._writer.value(self._buf))
            self._close_call(out)
        elif self._state in ("json", "lines"):
            self._close_call(out)
        elif self._state in ("head", "text"):
            self._content(out, self._buf)
        self._state = "done"

    def _run(self, out: ParsedDelta) -> None:
        while self._buf and self._step(out):
            pass

    def _step(self, out: ParsedDelta) -> bool:
        """Consume what the state allows; False when more text is needed."""
        state = self._state
        if state in ("head", "tool", "next"):
            marker = {"head": TOPIC, "tool": TOOL, "next": "\n" + TOOL}[state]
            seen = expect_prefix(self._buf, marker)
            if seen is None:
                return False
            if not seen:  # not our shape: plain text, or trailing junk after the calls
                self._state = "text" if state == "head" else "done"
                return True
            self._buf = self._buf[len(marker):]
            self._state = "topic" if state == "head" else "name"
        elif state == "topic":
            end = self._buf.find("\n")
            self._buf = self._buf[end + 1:] if end >= 0 else ""  # the topic is never shown
            if end < 0:
                return False
            self._state = "tool"
        elif state == "name":
            match = re.match(r"\s*([^\s{]+)[\s{]", self._buf)
            if match is None:
                return False
            word = match.group(1)
            self._buf = self._buf[match.end(1):]
            if word == NONE:
                self.needs_answer = True
                self._state = "done"
            elif word in self._forms:
                self._open_call(out, word)
            else:
                self._state = "done"
        elif state == "json":
            start, used = self._scanner.feed(self._buf)
            self._args(out, self._buf[start:used])
            self._buf = self._buf[used:]
            if not self._scanner.done:
                return False
            self._close_call(out)
            self._state = "next"
        elif state == "lines":
            return self._lines_step(out)
        elif state == "value":
            end = self._buf.find("\n")
            piece = self._buf if end < 0 else self._buf[:end]
            self._args(out, self._writer.value(piece))
            self._buf = "" if end < 0 else self._buf[end:]
            if end < 0:
                return False
            self._state = "lines"
        elif state == "text":
            self._content(out, self._buf)
            self._buf = ""
        else:  # done: nothing more is ours to show
            self._buf = ""
        return True

    def _lines_step(self, out: ParsedDelta) -> bool:
        """At a line break inside a call: another argument, another call, or junk."""
        assert self._writer is not None
        for name in self._writer.params:
            seen = expect_prefix(self._buf, f"\n{name}:")
            if seen:
                self._buf = self._buf[len(name) + 2:]
                self._args(out, self._writer.key(name))
                self._state = "value"
                return True
        if any(expect_prefix(self._buf, f"\n{name}:") is None for name in self._writer.params):
            return False
        self._close_call(out)
        self._state = "next"
        return True

    def _open_call(self, out: ParsedDelta, alias: str) -> None:
        name, line_args = self._forms[alias]
        if self.tool_calls:
            self._held = (name, [])
        else:
            self._start_call(out, name)
        if line_args is None:
            self._writer = None
            self._scanner = JsonObjectScanner()
            self._state = "json"
        else:
            self._writer = LineArgsWriter(line_args)
            self._args(out, self._writer.begin())
            self._state = "lines"

    def _args(self, out: ParsedDelta, fragment: str) -> None:
        if self._held is not None:
            self._held[1].append(fragment)
        else:
            self._arguments(out, fragment)

    def _complete(self, name: str, arguments: str) -> bool:
        """Whether a held call was finished (output may stop inside one: a length limit, or the
        grammar's stop right after a repeat)."""
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return False
        line_args = next((form for tool, form in self._forms.values() if tool == name), None)
        return line_args is None or all(k in parsed for k in line_args.required)

    def _same_call(self, call: ToolCall, name: str, arguments: str) -> bool:
        """A repeat: the same tool with the same arguments (for argument lines, the same
        required ones, as the grammar's repeat check)."""
        if call.name != name:
            return False
        line_args = next((form for tool, form in self._forms.values() if tool == name), None)
        if line_args is None:
            return call.arguments == arguments
        try:
            old, new = json.loads(call.arguments), json.loads(arguments)
        except json.JSONDecodeError:
            return call.arguments == arguments
        return all(old.get(k) == new.get(k) for k in line_args.required)

    def _close_call(self, out: ParsedDelta) -> None:
        if self._writer is not None:
            self._args(out, self._writer.end())
            self._writer = None
        if self._held is None:
            self._end_call(out)
            return
        name, fragments = self._held
        self._held = None
        arguments = "".join(fragments) or "{}"
        if not self._complete(name, arguments) or any(self._same_call(c, name, arguments) for c in self.tool_calls):
            return
        self._start_call(out, name)
        self._arguments(out, arguments)
        self._end_call(out)
