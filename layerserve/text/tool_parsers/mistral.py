"""Mistral format (v3 tokenizers: Mistral 7B v0.3, Mixtral 8x22B, Nemo, Small):
`[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, the marker a special token.

Mistral's templates insist on tool call ids of exactly 9 alphanumerics; OpenAI ids (`call_...`)
are mapped onto such ids, the same way for a call and for its result.
"""

from __future__ import annotations

import copy
import hashlib
import string
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
    free_text_terminal,
    new_call_id,
    split_at_marker,
)
from layerserve.text.tool_parsers.registry import TOOL_FORMATS
from layerserve.text.tool_parsers.schema import call_object_schema, json_schema_rule

MARKER = "[TOOL_CALLS]"
_ALNUM = string.ascii_letters + string.digits


def mistral_call_id(call_id: str) -> str:
    """A stable 9-alphanumeric id for any call id (ids that already fit are kept)."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    n = int.from_bytes(hashlib.sha256(call_id.encode("utf-8")).digest()[:8], "big")
    chars = []
    for _ in range(9):
        n, r = divmod(n, len(_ALNUM))
        chars.append(_ALNUM[r])
    return "".join(chars)


@TOOL_FORMATS.register(priority=10)
class MistralFormat(ToolFormat):
    name = "mistral"

    @classmethod
    def detect(cls, chat_template: str) -> bool:
        return MARKER in chat_template

    @property
    def keeps_special_tokens(self) -> bool:
        return self.is_special(MARKER)

    def prepare_messages(
        self, messages: list[dict[str, Any]], tools: list[ToolSpec], choice: ToolChoice
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        out = []
        for message in messages:
            message = copy.copy(message)
            if message.get("tool_calls"):
                message["tool_calls"] = [{**c, "id": mistral_call_id(c.get("id", ""))} for c in message["tool_calls"]]
            if message.get("role") == "tool" and "tool_call_id" in message:
                message["tool_call_id"] = mistral_call_id(message["tool_call_id"])
            out.append(message)
        return out, [t.openai() for t in tools] or None

    def grammar(self, tools: list[ToolSpec], choice: ToolChoice, parallel: bool, content_rule: str | None) -> Constraint:
        text_terminal = "TEXT: " + free_text_terminal([] if self.is_special(MARKER) else [MARKER])
        text = content_rule or "TEXT"
        if choice.mode is ChoiceMode.NONE:
            return Constraint(f"start: {text}\n{text_terminal}\n")
        items = 'obj (", " obj)*' if parallel and choice.mode is not ChoiceMode.NAMED else "obj"
        lines = [
            f"start: {text} | calls" if choice.mode is ChoiceMode.AUTO else "start: calls",
            f'calls: {self.literal(MARKER)} " [" {items} "]"',
            f"obj: {json_schema_rule(call_object_schema(tools))}",
            text_terminal,
        ]
        return Constraint("\n".join(lines) + "\n")

    def new_parser(self, tools: list[ToolSpec], id_factory: Callable[[], str] = new_call_id) -> ToolCallParser:
        return MistralParser(id_factory)


class MistralParser(JsonCallParser):
    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self._state = "text"  # text -> list -> call -> between -> call ... -> text

    def _end(self, out: ParsedDelta) -> None:
        if self._state == "call":
            self._close_object(out)
        elif self._state == "text":
            self._flush_text(out)

    def _run(self, out: ParsedDelta) -> None:
        while self._buf:
            if self._state == "text":
                before, after, found = split_at_marker(self._buf, MARKER)
                self._text(out, before)
                self._buf = after
                if not found:
                    return
                self._state = "list"
            elif self._state == "list":
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return
                if self._buf.startswith("["):
                    self._buf = self._buf[1:]
                self._state = "between"
            elif self._state == "between":
                self._buf = self._buf.lstrip(" \t\r\n,")
                if not self._buf:
                    return
                if self._buf.startswith("]"):
                    self._buf = self._buf[1:]
                    self._state = "text"
                    continue
                self._state = "call"
                self._begin_object()
            else:  # call
                if not self._scan_object(out):
                    return
                self._state = "between"
