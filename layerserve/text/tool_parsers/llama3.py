"""Llama 3.1 / 3.2 / 3.3 JSON format: the whole answer is `{"name": ..., "parameters": {...}}`
(several joined by "; " when parallel calls are allowed), optionally after `<|python_tag|>`."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from layerserve.text.tool_parsers.base import (
    ChoiceMode,
    Constraint,
    JsonCallParser,
    ParsedDelta,
    ToolCallParser,
    ToolChoice,
    ToolFormat,
    ToolSpec,
    expect_prefix,
    new_call_id,
)
from layerserve.text.tool_parsers.registry import TOOL_FORMATS
from layerserve.text.tool_parsers.schema import call_object_schema, json_schema_rule

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = "; "


@TOOL_FORMATS.register(priority=5)
class Llama3JsonFormat(ToolFormat):
    name = "llama3_json"

    @classmethod
    def detect(cls, chat_template: str) -> bool:
        return "<|start_header_id|>" in chat_template and (
            PYTHON_TAG in chat_template or '"parameters": ' in chat_template
        )

    def prepare_messages(
        self, messages: list[dict[str, Any]], tools: list[ToolSpec], choice: ToolChoice
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        # Llama's templates accept one call per assistant message: split parallel calls.
        out: list[dict[str, Any]] = []
        for message in messages:
            calls = message.get("tool_calls") or []
            if message.get("role") != "assistant" or len(calls) < 2:
                out.append(message)
                continue
            for i, call in enumerate(calls):
                part = copy.copy(message)
                part["tool_calls"] = [call]
                if i:
                    part.pop("content", None)
                out.append(part)
        return out, [t.openai() for t in tools] or None

    def grammar(self, tools: list[ToolSpec], choice: ToolChoice, parallel: bool, content_rule: str | None) -> Constraint:
        # Text answers may not start with "{", so a call is never mistaken for text.
        text_terminal = "TEXT: /[^{](?s:.*)/"
        if choice.mode is ChoiceMode.NONE:
            return Constraint(f"start: {content_rule or 'TEXT'}\n{text_terminal}\n")
        calls = f'call ("{SEPARATOR}" call)*' if parallel and choice.mode is not ChoiceMode.NAMED else "call"
        start = f"start: {content_rule or 'TEXT'} | calls" if choice.mode is ChoiceMode.AUTO else "start: calls"
        schema = call_object_schema(tools, args_key="parameters")
        return Constraint("\n".join([start, f"calls: {calls}", f"call: {json_schema_rule(schema)}", text_terminal]) + "\n")

    def new_parser(self, tools: list[ToolSpec], id_factory: Callable[[], str] = new_call_id) -> ToolCallParser:
        return Llama3JsonParser(id_factory)


class Llama3JsonParser(JsonCallParser):
    """The output is decided at its first non-space character: `{` (or the python tag) means
    calls, anything else a text answer that is passed through whole."""

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self._state = "start"  # start -> text | between -> call -> between ...

    def _end(self, out: ParsedDelta) -> None:
        if self._state == "call":
            self._close_object(out)
        elif self._state in ("start", "text"):
            self._content(out, self._buf)

    def _run(self, out: ParsedDelta) -> None:
        while self._buf:
            if self._state == "start":
                stripped = self._buf.lstrip()
                if not stripped:
                    return
                tagged = expect_prefix(stripped, PYTHON_TAG)
                if tagged is None:
                    return
                if tagged:
                    stripped = stripped[len(PYTHON_TAG):]
                if tagged or stripped.startswith("{"):
                    self._buf, self._state = stripped, "between"
                else:
                    self._state = "text"
            elif self._state == "text":
                self._content(out, self._buf)
                self._buf = ""
            elif self._state == "between":
                self._buf = self._buf.lstrip(" \t\r\n;")
                if not self._buf:
                    return
                if not self._buf.startswith("{"):  # trailing junk after the calls
                    self._buf = ""
                    return
                self._state = "call"
                self._begin_object()
            else:  # call
                if not self._scan_object(out):
                    return
                self._state = "between"
