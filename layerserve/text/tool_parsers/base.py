"""What every tool-call format shares: the tool and choice types, the streaming output deltas, and
the `ToolFormat` / `ToolCallParser` interfaces that each format file implements.

A format answers four questions for one model family:
- does this chat template speak it (`detect`)?
- what do the template (or, for the generic format, we) see of tools and of past calls and
  results (`prepare_messages`)?
- what may the model write, given the tools and `tool_choice` (`grammar`, a Lark grammar in
  llguidance's dialect)?
- how does its output, fed one text piece at a time, split into `content` and tool calls
  (`new_parser`)?
"""

from __future__ import annotations

import enum
import json
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from layerserve.text.tool_parsers.json_stream import CallObjectScanner

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style tool call id: `call_` and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function tool, validated: `parameters` is always an object schema."""

    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The tool in OpenAI's shape, as chat templates expect it in `tools`."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


class ChoiceMode(enum.Enum):
    AUTO = "auto"  # the model chooses between text and calls
    NONE = "none"  # text only; the tools are still shown
    REQUIRED = "required"  # at least one call
    NAMED = "named"  # exactly one call of `ToolChoice.name`


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ChoiceMode
    name: str | None = None  # the tool, for NAMED
    allowed: tuple[str, ...] | None = None  # AUTO / REQUIRED over this subset ("allowed_tools")


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the output must match: a Lark grammar in llguidance's dialect (compiled by
    `layerserve.model.guided.GrammarCompiler.compile`)."""

    grammar: str
    # A stop check: each time the output ends with `stop_after`, `stop_when(output)` may end it
    # (e.g. a small model listing the same tool call again and again is stopped as the call
    # after the first repeat begins).
    stop_after: str | None = None
    stop_when: Callable[[str], bool] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A finished call: `arguments` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ToolCallDelta:
    """One piece of a streamed call, as in OpenAI's `delta.tool_calls[i]`: the first piece of a
    call carries `id` and `name` (and maybe arguments); later ones only argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ParsedDelta:
    """What one `feed` produced: a content fragment and tool-call pieces (either may be empty)."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


class ToolCallParser(ABC):
    """Splits one sample's output into content and tool calls, incrementally.

    Feed it the text pieces as they are generated (`feed`), then call `finish` once. Markup is
    never returned as content: text that could still be the start of a marker is held back until
    it is decided. After `finish`, `tool_calls` holds every call and `content` all content text.
    """

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        self._new_id = id_factory
        self.tool_calls: list[ToolCall] = []
        self.content = ""
        # True when the output chose to answer in text but the text comes from a follow-up
        # request (`ChatPlan.answer`), as in the generic format.
        self.needs_answer = False
        self._open: tuple[str, str, list[str]] | None = None  # (id, name, argument fragments)
        self._buf = ""  # text received but not yet decided

    def feed(self, text: str) -> ParsedDelta:
        """Consume the next piece of generated text."""
        out = ParsedDelta()
        self._buf += text
        self._run(out)
        return out

    def finish(self) -> ParsedDelta:
        """End of output: release whatever was held back."""
        out = ParsedDelta()
        self._run(out)
        self._end(out)
        self._buf = ""
        return out

    @abstractmethod
    def _run(self, out: ParsedDelta) -> None:
        """Advance the state machine over `self._buf` as far as it is decided."""

    @abstractmethod
    def _end(self, out: ParsedDelta) -> None:
        """The output ended in the current state: close or release what is pending."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Whole-output convenience: (content or None when empty, calls)."""
        self.feed(text)
        self.finish()
        return (self.content or None), self.tool_calls

    # -- helpers for subclasses: every delta goes through these, so `content` and `tool_calls`
    #    always equal the concatenation of what was streamed.
    def _content(self, out: ParsedDelta, text: str) -> None:
        if text:
            out.content += text
            self.content += text

    def _start_call(self, out: ParsedDelta, name: str) -> None:
        call_id = self._new_id()
        self._open = (call_id, name, [])
        out.tool_calls.append(ToolCallDelta(len(self.tool_calls), call_id, name, ""))

    def _arguments(self, out: ParsedDelta, fragment: str) -> None:
        if not fragment or self._open is None:
            return
        self._open[2].append(fragment)
        index = len(self.tool_calls)
        last = out.tool_calls[-1] if out.tool_calls else None
        if last is not None and last.index == index:
            last.arguments += fragment
        else:
            out.tool_calls.append(ToolCallDelta(index, arguments=fragment))

    def _end_call(self, out: ParsedDelta) -> None:
        if self._open is None:
            return
        call_id, name, fragments = self._open
        if not fragments:  # a call without arguments still sends "{}"
            self._arguments(out, "{}")
        self.tool_calls.append(ToolCall(call_id, name, "".join(self._open[2])))
        self._open = None


class JsonCallParser(ToolCallParser):
    """Base of parsers whose calls are `{"name": ..., "arguments": ...}` objects. Subclasses keep
    unparsed text in `_buf`, call `_begin_object()` at an object's `{` and `_scan_object(out)`
    while it streams; argument text that arrives before the name waits for it."""

    ARGS_KEYS: ClassVar[tuple[str, ...]] = ("arguments", "parameters")

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self._buf = ""
        self._ws = ""  # whitespace held back at the end of text (dropped when a call follows)
        self._scanner: CallObjectScanner | None = None
        self._pending: list[str] = []

    def _text(self, out: ParsedDelta, text: str) -> None:
        """Content, except trailing whitespace, which waits to see whether a call follows."""
        if not text:
            return
        body = text.rstrip()
        if body:
            self._content(out, self._ws + body)
            self._ws = text[len(body):]
        else:
            self._ws += text

    def _flush_text(self, out: ParsedDelta) -> None:
        """End of output in text: held whitespace is content unless calls were made."""
        if not self.tool_calls:
            self._content(out, self._ws)
        self._content(out, self._buf)
        self._buf = self._ws = ""

    def _begin_object(self) -> None:
        self._ws = ""
        self._scanner, self._pending = CallObjectScanner(self.ARGS_KEYS), []

    def _scan_object(self, out: ParsedDelta) -> bool:
        """Feed `_buf` to the open object; True once it is complete (and the call closed)."""
        assert self._scanner is not None
        used, args = self._scanner.feed(self._buf)
        self._buf = self._buf[used:]
        self._progress(out, args)
        if self._scanner.done:
            self._close_object(out)
        return self._scanner.done

    def _close_object(self, out: ParsedDelta) -> None:
        """End the open call (also when output stopped inside it)."""
        if self._open is None and self._scanner is not None and self._scanner.name is not None:
            self._progress(out, "")
        self._end_call(out)

    def _progress(self, out: ParsedDelta, args: str) -> None:
        assert self._scanner is not None
        if self._open is None:
            if self._scanner.name is None:
                self._pending.append(args)
                return
            self._start_call(out, self._scanner.name)
            args = "".join(self._pending) + args
        self._arguments(out, args)


class ToolFormat(ABC):
    """A model family's way of calling tools. Subclasses register with `@TOOL_FORMATS.register`.

    An instance is built once per loaded model, from its tokenizer (formats whose markers are
    special tokens look their ids up there).
    """

    name: ClassVar[str]
    # After tool results, auto mode may not call the tools that produced them again, so that a
    # small model answers instead of looping (set by formats for models without tool training).
    answer_after_results: ClassVar[bool] = False
    # Text answers come from a separate request rendered by `answer_messages` (the output of
    # the tool request then only decides, and the answer is written without routing markup in
    # its context). Formats that set it implement `answer_messages`.
    separate_answer: ClassVar[bool] = False
    # The tool request is sampled greedily whatever the request's temperature (its output is
    # routing and call arguments, where a small model's best guess beats its samples).
    greedy_calls: ClassVar[bool] = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the markers this format parses are special tokens, which decoding must then
        keep in the text (`SamplingParams.skip_special_tokens = False`)."""
        return False

    @classmethod
    @abstractmethod
    def detect(cls, chat_template: str) -> bool:
        """Whether this chat template renders tools and calls in this format."""

    def prepare_messages(
        self, messages: list[dict[str, Any]], tools: list[ToolSpec], choice: ToolChoice
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(messages, tools) to hand the chat template. Messages arrive normalized (see
        `layerserve.text.tools.normalize_messages`): call arguments are objects, tool results
        carry `name`. Formats whose templates know tools pass both through."""
        return messages, [t.openai() for t in tools] or None

    def answer_messages(self, messages: list[dict[str, Any]], tools: list[ToolSpec], choice: ToolChoice) -> list[dict[str, Any]]:
        """Messages for the text-answer request of `separate_answer` formats."""
        raise NotImplementedError

    @abstractmethod
    def grammar(self, tools: list[ToolSpec], choice: ToolChoice, parallel: bool, content_rule: str | None) -> Constraint:
        """The constraint for the whole output (a Lark grammar and hints).

        `tools` are the ones that may be called now (for NAMED, just that one; never empty unless
        the mode is NONE, which allows text only). `parallel`: several calls may follow each
        other (never for NAMED). `content_rule` is a Lark expression a text answer must match
        (e.g. a `%json` rule for response_format); None: free text. The grammar must keep the
        format's markers out of text answers."""

    @abstractmethod
    def new_parser(self, tools: list[ToolSpec], id_factory: Callable[[], str] = new_call_id) -> ToolCallParser:
        """A fresh streaming parser for one sample's output."""

    # -- helpers for grammars
    def literal(self, text: str) -> str:
        """A Lark item for marker `text`: the special token by id when the vocabulary has it as
        one (so the model writes the token it was trained on), else the quoted string."""
        token_id = self.tokenizer.hf_tokenizer.token_to_id(text)
        if token_id is not None and self.tokenizer.is_special(token_id):
            return f"<[{token_id}]>"
        return json.dumps(text)

    def is_special(self, text: str) -> bool:
        token_id = self.tokenizer.hf_tokenizer.token_to_id(text)
        return token_id is not None and self.tokenizer.is_special(token_id)


def free_text_terminal(forbidden: list[str], nonempty: bool = True) -> str:
    """A Lark terminal for text that never contains any of `forbidden` (markers spelled as text),
    using llguidance's and-not regex operators."""
    body = "/(?s:.+)/" if nonempty else "/(?s:.*)/"
    for marker in forbidden:
        escaped = "".join("\\" + c if c in "\\.^$|?*+()[]{}/" else c for c in marker)
        body += f" & ~/(?s:.*){escaped}(?s:.*)/"
    return body


def split_at_marker(buf: str, marker: str) -> tuple[str, str, bool]:
    """Split `buf` at the first `marker`: (before, after, True). Without one: (the part that can
    be released, the tail that could still grow into the marker, False)."""
    at = buf.find(marker)
    if at >= 0:
        return buf[:at], buf[at + len(marker):], True
    for k in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:k]):
            return buf[:-k], buf[-k:], False
    return buf, "", False


def expect_prefix(buf: str, text: str) -> bool | None:
    """Whether `buf` starts with `text`: True, False, or None while `buf` is still too short."""
    if buf.startswith(text):
        return True
    return None if text.startswith(buf) else False
