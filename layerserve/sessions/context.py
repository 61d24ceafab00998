"""How a session's context is laid out in tokens.

A session's durable context is its data section (the pushed entries) followed by its
conversation (the last turn's messages and reply). The data is a system message the chat
template renders first: its opening is the template's own text before the message content, each
entry is the entry's text and a newline, tokenized as plain text (a pushed "<|im_end|>" stays
text). A turn or a question is the rest of the template's rendering after that system message:

    [data prefix][entry 1][entry 2]...[entry n] | [the turn's messages, rendered after the data]

so appending entries and asking questions only ever extends the tokens the session holds, and a
question costs its own tokens. A session without data renders its turns exactly as a stateless
request would (no data message at all).

Questions are rendered in two pieces, the opening before the question's text and the rest, so the
opening (the "ready position" of a `pre_decode` session) is a token prefix of every question.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from layerserve.api.chat_prompt import template_prompt_ids
from layerserve.api.state import Runtime


@dataclass(frozen=True, slots=True)
class DataLayout:
    """The template's pieces around the data message, tokenized once per server."""

    prefix: list[int]  # the template's text before the data message's content (BOS, role header)


def _mark() -> str:
    return f"@@layerserve-{secrets.token_hex(8)}@@"


def data_layout(rt: Runtime) -> DataLayout:
    mark = _mark()
    text = rt.template.render_request([{"role": "system", "content": mark}], None, False, None)
    return DataLayout(rt.tokenizer.encode_prompt(text.split(mark, 1)[0]))


def entry_tokens(rt: Runtime, text: str) -> list[int]:
    """One pushed entry's tokens: its text and a newline, as plain text."""
    return rt.tokenizer.encode_plain(text + "\n")


def turn_tokens(rt: Runtime, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                extra: dict[str, Any] | None, data: list[int] | None, *, question: bool = False) -> list[int]:
    """The prompt of a turn (or, with `question`, of a one-message question) on a session whose
    data section is `data` (None: no data). The data section is a prefix of the result whenever
    the template renders the data message the same way with these tools."""
    if data is None:
        return template_prompt_ids(rt, messages, tools, extra)
    mark = _mark()
    literals = rt.tokenizer.literals()
    text = rt.template.render_request([{"role": "system", "content": mark}, *messages], tools, True, extra,
                                      literals.hide)
    before, after = text.split(mark, 1)
    rt.check_fits(literals.restored_length(after), "messages")
    head = rt.tokenizer.encode_prompt(before, literals)
    if question:
        return head + data + question_tail(rt, after, messages[-1]["content"], literals)
    return head + data + rt.tokenizer.encode_prompt(after, literals)


def question_tail(rt: Runtime, after: str, question: str, literals) -> list[int]:
    """The tokens after the data for a question: the opening, then the question and the rest."""
    hidden = literals.hide(question)
    at = after.rfind(hidden)
    if at < 0:  # the template changed the question's text: no ready position, one piece
        return rt.tokenizer.encode_prompt(after, literals)
    return rt.tokenizer.encode_prompt(after[:at], literals) + rt.tokenizer.encode_prompt(after[at:], literals)


def question_opening(rt: Runtime, data: list[int]) -> list[int]:
    """The tokens of any question's opening after `data` (the ready position)."""
    mark = _mark()
    literals = rt.tokenizer.literals()
    text = rt.template.render_request([{"role": "system", "content": mark}, {"role": "user", "content": mark}],
                                      None, True, None, literals.hide)
    _, after = text.split(mark, 1)
    return rt.tokenizer.encode_prompt(after.split(mark, 1)[0], literals)
