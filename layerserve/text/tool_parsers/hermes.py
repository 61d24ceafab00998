"""Hermes / Qwen format: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, after
optional text, one block per call (Qwen2.5, Qwen3, Hermes 2/3 and many fine-tunes)."""

from __future__ import annotations

from collections.abc import Callable

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
    free_text_terminal,
    new_call_id,
    split_at_marker,
)
from layerserve.text.tool_parsers.registry import TOOL_FORMATS
from layerserve.text.tool_parsers.schema import call_object_schema, json_schema_rule

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _escaped(text: str) -> str:
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}/" else c for c in text)


@TOOL_FORMATS.register(priority=10)
class HermesFormat(ToolFormat):
    name = "hermes"

    @classmethod
    def detect(cls, chat_template: str) -> bool:
        return OPEN in chat_template and CLOSE in chat_template

    @property
    def keeps_special_tokens(self) -> bool:
        return self.is_special(OPEN)

    def grammar(self, tools: list[ToolSpec], choice: ToolChoice, parallel: bool, content_rule: str | None) -> Constraint:
        special = self.is_special(OPEN)
        text_terminal = "TEXT: " + free_text_terminal([] if special else [OPEN])
        text = content_rule or "TEXT"
        if choice.mode is ChoiceMode.NONE:
            return Constraint(f"start: {text}\n{text_terminal}\n")
        more = ' ("\\n" call)*' if parallel and choice.mode is not ChoiceMode.NAMED else ""
        body = f'"\\n" obj "\\n" {self.literal(CLOSE)}'
        if choice.mode is not ChoiceMode.AUTO:
            start = f"start: call{more}"
        elif content_rule:  # a JSON answer or calls, not both
            start = f"start: {content_rule} | call{more}"
        else:
            # Text, or text up to the first marker and calls. The lead-in is a lazy lexeme that
            # ends at the marker (a greedy text lexeme would swallow it).
            start = f"start: TEXT | lead_in {body}{more}"
        lines = [
            start,
            f"call: {self.literal(OPEN)} {body}",
            f"lead_in: TEXT? {self.literal(OPEN)}" if special else f"lead_in[lazy]: /(?s:.*){_escaped(OPEN)}/",
            f"obj: {json_schema_rule(call_object_schema(tools))}",
            text_terminal,
        ]
        return Constraint("\n".join(lines) + "\n")

    def new_parser(self, tools: list[ToolSpec], id_factory: Callable[[], str] = new_call_id) -> ToolCallParser:
        return HermesParser(id_factory)


class HermesParser(JsonCallParser):
    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self._state = "text"  # text -> call -> close -> text ...

    def _end(self, out: ParsedDelta) -> None:
        if self._state == "call":
            self._close_object(out)
        elif self._state == "text":
            self._flush_text(out)

    def _run(self, out: ParsedDelta) -> None:
        while self._buf:
            if self._state == "text":
                before, after, found = split_at_marker(self._buf, OPEN)
                self._text(out, before)
                self._buf = after
                if not found:
                    return
                self._state = "call"
                self._begin_object()
            elif self._state == "call":
                if not self._scan_object(out):
                    return
                self._state = "close"
            else:  # close: whitespace, then </tool_call>
                self._buf = self._buf.lstrip()
                seen = expect_prefix(self._buf, CLOSE)
                if seen is None:
                    return
                if seen:
                    self._buf = self._buf[len(CLOSE):].lstrip()
                self._state = "text"
