"""A chat turn in a session, on any chat surface (`x-layerscale-session-id` on chat completions
and on messages): the turn's prompt is rendered after the session's data, runs on the session's
held KV, and its reply joins the session's durable context -- journaled before the answer goes
out (the engine requests' last outputs are seen before the surface sends its last event)."""

from __future__ import annotations

from typing import Any

from layerserve.engine.request import FinishReason, RequestOutput
from layerserve.sessions.context import turn_tokens
from layerserve.sessions.session import Session
from layerserve.sessions.store import SessionStore
from layerserve.text.tools import ChatPlan

class SessionTurn:
    def __init__(self, store: SessionStore, session: Session) -> None:
        self.store = store
        self.session = session
        self._counted = False
        self._locked = False
        self._closed = False
        self._messages: tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any] | None] | None = None

    @property
    def session_id(self) -> str:
        return self.session.id

    async def open(self) -> None:
        """Claim the session (409 when a turn or question is on it) and wait for background work
        to give way."""
        self.session.claim("turn")
        try:
            await self.session.take_lock()
        except BaseException:
            self.session.release("turn")
            raise
        self._locked = True
        self.session.warmed = False  # the turn a warm turn prepared (if any) is here

    def prompt(self, plan: ChatPlan, rt, extra: dict[str, Any] | None) -> list[int]:
        """The turn's prompt ids (on a prep thread): after the session's data, if it has some."""
        session = self.session
        entries = session.entry_ids() if session.has_data else None
        self._messages = (plan.messages, plan.tools, extra)
        return turn_tokens(rt, plan.messages, plan.tools, extra, entries)

    def ended(self, out: RequestOutput) -> None:
        """One of the turn's engine requests ended: the session holds its tokens; a reply that
        finished joins the durable context (journaled now, before the answer goes out)."""
        session = self.session
        session.held(out)
        reason = next((d.finish_reason for d in out.deltas if d.finish_reason is not None), None)
        if out.error is not None or reason not in (FinishReason.STOP, FinishReason.LENGTH) or session.deleted:
            return
        tokens = out.session_token_ids or []
        data = session.data_section()
        # The conversation is what follows the data (nothing, where a template rendered the data
        # differently for this turn's tools: the data stays, the next turn computes it again).
        session.conversation = tokens[len(data):] if tokens[:len(data)] == data else []
        session.data_mode = session.has_data
        if not self._counted:
            self._counted = True
            session.turns += 1
            self.store.work.counters.turns += 1
            self.store.work.counters.cached_tokens += out.held_tokens
        session.data_version += 1
        session.journal.turn(session.id, session.conversation, session.data_mode, session.turns, session.data_version)

    def replied(self, text: str) -> None:
        """The reply's text, so that questions asked later are rendered after this conversation."""
        if self._messages is not None:
            messages, tools, extra = self._messages
            self.session.chat = ([*messages, {"role": "assistant", "content": text}], tools, extra)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._locked:
            self.session.lock.release()
        self.session.release("turn")
        if not self.session.deleted:
            self.session.data_updated()
            self.store.work.wake(self.session)
