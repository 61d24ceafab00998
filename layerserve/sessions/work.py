"""The engine work sessions do: ingesting pushed data, answering flash queries, the ready
position, questions (`generate`) and warm turns. Each is one engine request on the session's held
KV (`Run(..., session_id=...)`): the engine diffs its prompt against what the session holds and
computes only the tail.

Background work (ingest, flash answers, the ready position, warm turns) runs in the engine's
background class: a share of every step's token budget, never ahead of interactive requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from layerserve.api.runs import Run
from layerserve.api.state import Runtime
from layerserve.engine.request import FinishReason, RequestOutput, SamplingParams
from layerserve.sessions.context import entry_tokens, question_opening, turn_tokens
from layerserve.sessions.session import Entry, FlashQuery, Session

log = logging.getLogger("layerserve.sessions")

INGEST_BATCH_BYTES = 256 << 10  # text taken into one ingest request
QUESTION_ROOM = 512  # tokens kept free past the data for questions and their answers


@dataclass(slots=True)
class SessionCounters:
    turns: int = 0
    cached_tokens: int = 0  # prompt tokens session turns resumed from held KV
    ingested_tokens: int = 0
    warm_turns: int = 0
    warmed_tokens: int = 0
    flash_hits: int = 0
    ready_exits: int = 0
    flash_answers: int = 0
    expired: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"session_turns": self.turns, "session_cached_tokens": self.cached_tokens,
                "session_ingested_tokens": self.ingested_tokens, "session_warm_turns": self.warm_turns,
                "session_warmed_tokens": self.warmed_tokens, "session_flash_hits": self.flash_hits,
                "session_ready_exits": self.ready_exits}


@dataclass(slots=True)
class Answer:
    """What a question's engine request produced."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    held_tokens: int
    first_gap: float | None = None  # logit gap of the first token (top-1 minus top-2)
    first_token: int | None = None


@dataclass(slots=True)
class Question:
    prompt: str
    params: SamplingParams
    extra: dict[str, Any] | None = None  # chat_template_kwargs


class SessionWork:
    def __init__(self, rt: Runtime, metrics=None) -> None:
        self.rt = rt
        self.metrics = metrics
        self.counters = SessionCounters()
        self._ids = itertools.count()

    def request_id(self, session: Session, kind: str) -> str:
        return f"{session.id}-{kind}-{next(self._ids)}"

    def run(self, session: Session, kind: str, prompt_ids: list[int], params: SamplingParams, *,
            background: bool) -> Run:
        return Run(self.rt.engine, self.request_id(session, kind), prompt_ids, params, self.metrics,
                   session_id=session.id, background=background)

    async def finish(self, session: Session, run: Run) -> RequestOutput:
        """Run to its end; the session mirrors what the engine holds afterwards."""
        last = None
        try:
            async for out in run:
                last = out
        finally:
            run.close()
        session.held(last)
        return last

    # ---- ingest ------------------------------------------------------------------------
    def wake(self, session: Session) -> None:
        """Make sure the session's background worker runs (after a push or a turn)."""
        if session.worker is None or session.worker.done():
            session.worker = asyncio.get_running_loop().create_task(self._work(session))

    async def _work(self, session: Session) -> None:
        try:
            while not session.deleted:
                if session.pending or session.unsettled:
                    await self._ingest_batch(session)
                    continue
                if not await self._answer_flash(session) and not await self._ready_position(session):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background work on session %s failed; it resumes with the next push", session.id)

    def window(self, session: Session) -> int:
        """The most data tokens the session holds: its window, capped by what the context holds."""
        cap = max(self.rt.engine.max_model_len - QUESTION_ROOM, self.rt.engine.max_model_len // 2)
        return min(session.window, cap) if session.window is not None else cap

    async def _ingest_batch(self, session: Session) -> None:
        async with session.lock:
            if session.deleted:
                return
            if session.pending:
                # The batch leaves the pending queue in memory and in the journal at once (a drop
                # after this point takes other entries, in both); it is stamped with the version
                # it will have once KV-resident, so a restart never shows an older version.
                batch = session.take_pending(INGEST_BATCH_BYTES)
                session.journal.ingest(session.id, len(batch), 0, session.data_version + 1)
                session.unsettled = True
                ids = await self.rt.offload(lambda: [entry_tokens(self.rt, text) for text in batch])
                session.entries.extend(Entry(text, tokens) for text, tokens in zip(batch, ids))
                evicted = session.evict_to_window(self.window(session))
                if evicted:
                    session.journal.ingest(session.id, 0, evicted, session.data_version + 1)
                if session.conversation is not None and not session.data_mode:
                    session.conversation = None  # rendered without data: the next turn renders it after the data
                    session.chat = None
                    session.journal.forget_conversation(session.id)
                self.counters.ingested_tokens += sum(len(t) for t in ids)
            run = self.run(session, "ingest", session.durable_tokens(), SamplingParams(max_tokens=0), background=True)
            session.background = run
            try:
                out = await self.finish(session, run)
            finally:
                session.background = None
            if _reason(out) is FinishReason.ABORT:
                return  # a foreground request took over; it resumes after it (what was computed is kept)
            if session.deleted:
                return
            session.unsettled = False
            session.warmed = False  # new data: the warm turn's conversation follows it no more
            session.data_version += 1
        session.data_updated()

    # ---- questions ---------------------------------------------------------------------
    def question_ids(self, session: Session, question: Question) -> list[int]:
        """A question's prompt: after the durable context (the last turn's messages, if known)."""
        messages, tools, extra = session.chat or ([], None, None)
        if session.chat is None and session.conversation is not None and session.data_mode == session.has_data:
            messages = []  # the conversation's messages are not known (restored): ask after the data
        extra = question.extra if question.extra is not None else extra
        entries = session.entry_ids() if session.has_data else None
        return turn_tokens(self.rt, [*messages, {"role": "user", "content": question.prompt}], tools, extra,
                           entries, question=True)

    async def ask(self, session: Session, question: Question, *, background: bool,
                  kind: str = "generate") -> AsyncIterator[tuple[str, RequestOutput]]:
        """A question's text deltas as they come, with each output (the last one finishes it)."""
        ids = await self.rt.offload(self.question_ids, session, question)
        run = self.run(session, kind, ids, question.params, background=background)
        if background:
            session.background = run
        last = None
        try:
            async for out in run:
                last = out
                yield "".join(d.text for d in out.deltas), out
        finally:
            run.close()
            if background:
                session.background = None
            if last is not None:
                session.held(last)

    async def answer(self, session: Session, question: Question, *, background: bool, kind: str) -> Answer:
        text, out, first = "", None, None
        async for piece, out in self.ask(session, question, background=background, kind=kind):
            text += piece
            for d in out.deltas:
                if first is None and d.logprobs:
                    first = d.logprobs[0]
        gap = None
        if first is not None and len(first.top) >= 2:
            gap = first.top[0][1] - first.top[1][1]
        reason = _reason(out)
        return Answer(text, reason.value if reason else "stop", out.prompt_tokens, out.completion_tokens,
                      out.cached_tokens, out.held_tokens, gap, first.token_id if first else None)

    # ---- flash queries -----------------------------------------------------------------
    async def _answer_flash(self, session: Session) -> bool:
        """Answer one stale flash query; False when all are fresh (or a warm turn's KV is held)."""
        if session.warmed:
            return False
        for fq in list(session.flash.values()):
            if fq.data_version == session.data_version or fq.id not in session.flash:
                continue
            async with session.lock:
                if session.deleted or session.pending or fq.id not in session.flash:
                    return True
                version = session.data_version
                question = Question(fq.query, SamplingParams(max_tokens=fq.max_tokens, temperature=0.0, logprobs=2))
                ans = await self.answer(session, question, background=True, kind="flash")
                if ans.finish_reason == "abort":
                    return True  # a foreground request took over; answer it again afterwards
            fq.value, fq.data_version, fq.evaluated_at = ans.text, version, int(time.time())
            fq.confidence = ans.first_gap if ans.first_gap is not None else 0.0
            fq.tokens = ans.prompt_tokens - ans.cached_tokens
            self.counters.flash_answers += 1
            session.publish("flash_ready", fq.ready_event())
            return True
        return False

    def flash_hit(self, session: Session, question: Question) -> FlashQuery | None:
        """A fresh flash answer to exactly this question (asked with the default settings)."""
        if question.extra:
            return None
        for fq in session.flash.values():
            if fq.query == question.prompt and fq.value is not None and fq.data_version == session.data_version:
                return fq
        return None

    # ---- the ready position (pre_decode) ---------------------------------------------------
    async def _ready_position(self, session: Session) -> bool:
        """For a pre_decode session: hold the data and a question's opening, so the next question
        computes only itself; record the model's next token there and its logit gap."""
        if not session.pre_decode or session.ready_version == session.data_version or not session.has_data \
                or session.warmed:
            return False
        async with session.lock:
            if session.deleted or session.pending:
                return True
            version = session.data_version
            opening = await self.rt.offload(question_opening, self.rt, session.entry_ids())
            ids = session.durable_tokens() + opening
            run = self.run(session, "ready", ids, SamplingParams(max_tokens=1, temperature=0.0, logprobs=2),
                           background=True)
            session.background = run
            try:
                out = await self.finish(session, run)
            finally:
                session.background = None
            probs = [lp for d in out.deltas for lp in (d.logprobs or [])]
            if not probs or _reason(out) is FinishReason.ABORT:
                return True
            top = probs[0].top
            session.ready_token = probs[0].token_id
            session.ready_gap = top[0][1] - top[1][1] if len(top) >= 2 else 0.0
            session.ready_version = version
        return True

    # ---- warm turns --------------------------------------------------------------------
    async def warm(self, session: Session, prompt_ids: list[int]) -> tuple[RequestOutput | None, str]:
        """Prefill a conversation into the session (background class); a turn or a newer warm
        turn takes over at a step boundary."""
        if session.warm is not None:
            session.warm.cancel()
        await session.take_lock()
        try:
            if session.foreground is not None:  # a turn came in while this waited: it takes over
                return None, "cancelled"
            run = self.run(session, "warm", prompt_ids, SamplingParams(max_tokens=0), background=True)
            session.warm = run
            try:
                out = await self.finish(session, run)
            finally:
                if session.warm is run:
                    session.warm = None
        finally:
            session.lock.release()
        self.counters.warm_turns += 1
        if _reason(out) is FinishReason.ABORT:
            return out, "cancelled"
        session.warmed = True
        if out.held_tokens >= len(prompt_ids):
            return out, "covered"
        self.counters.warmed_tokens += len(prompt_ids) - out.cached_tokens
        return out, "warmed"


def _reason(out: RequestOutput | None) -> FinishReason | None:
    if out is None:
        return None
    for d in out.deltas:
        if d.finish_reason is not None:
            return d.finish_reason
    return None
