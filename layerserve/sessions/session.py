"""One session's state as the server sees it: its data, its conversation, its flash queries, who
is on it, and its event subscribers. The KV itself is the engine's (engine/held.py); this side
keeps what the tokens are and why, and mirrors the engine's counts from each request's end.

Concurrency: one engine request runs on a session at a time (`lock`). Foreground work (a turn, a
`generate`) takes the lock ahead of background work (ingest, flash answers, a warm turn): it
cancels the background request at its next step -- what was computed stays with the session --
and the background work resumes after it. A second foreground request is a 409.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from layerserve.api.errors import ConflictError
from layerserve.engine.held import common_prefix
from layerserve.sessions.context import DataLayout
from layerserve.sessions.journal import FlashRecord, Journal, SessionRecord

EVENT_QUEUE = 1024  # events a subscriber may fall behind before its stream is closed


@dataclass(slots=True)
class Entry:
    text: str
    tokens: list[int]


@dataclass(slots=True)
class FlashQuery:
    id: int
    query: str
    max_tokens: int
    tokens: int = 0  # the question's prompt tokens after the data, once evaluated
    value: str | None = None
    data_version: int | None = None
    confidence: float | None = None
    evaluated_at: int | None = None

    def as_dict(self, current_version: int) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": "session.flash_query", "query": self.query,
                                "max_tokens": self.max_tokens, "tokens": self.tokens,
                                "fresh": self.value is not None and self.data_version == current_version}
        if self.value is not None:
            body.update(value=self.value, data_version=self.data_version, confidence=self.confidence,
                        evaluated_at=self.evaluated_at)
        return body

    def ready_event(self) -> dict[str, Any]:
        return {"id": self.id, "query": self.query, "value": self.value, "data_version": self.data_version,
                "confidence": self.confidence}


@dataclass(slots=True)
class Limits:
    max_pending_entries: int = 4096  # pushed, not ingested; past it the oldest are dropped
    max_pending_bytes: int = 8 << 20
    max_flash: int = 20
    max_flash_tokens: int = 256


class Session:
    def __init__(self, rec: SessionRecord, layout: DataLayout, journal: Journal, limits: Limits,
                 tokenize: Callable[[str], list[int]]) -> None:
        self.id = rec.id
        self.created_ms = rec.created_ms
        self.last_used = time.time()
        self.window = rec.window
        self.pre_decode = rec.pre_decode
        self.layout = layout
        self.journal = journal
        self.limits = limits
        self.entries: deque[Entry] = deque(Entry(t, tokenize(t)) for t in rec.durable)
        self.pending: deque[str] = deque(rec.pending)
        self.pending_bytes = sum(len(t.encode()) for t in self.pending)
        self.evicted = rec.evicted
        self.total_pushed = rec.total_pushed
        self.total_dropped = rec.total_dropped
        self.data_version = rec.data_version
        self.turns = rec.turns
        self.conversation: list[int] | None = rec.conversation
        self.data_mode = rec.data_mode  # whether `conversation` was rendered after a data section
        # The last turn's messages (its reply appended), tools and template variables: questions are
        # rendered after them. Not journaled: after a restart questions follow the data alone.
        self.chat: tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any] | None] | None = None
        self.flash: dict[int, FlashQuery] = {f.fid: FlashQuery(f.fid, f.query, f.max_tokens) for f in rec.flash}
        self.next_flash_id = rec.next_flash_id
        self.tokens = 0  # what the engine holds for it (mirrored from each request's end)
        self.kv_tokens = 0
        self.ready_token: int | None = None
        self.ready_gap: float | None = None
        self.ready_version: int | None = None  # the data version the ready position was computed at
        self.unsettled = False  # entries taken from `pending` whose KV is not resident yet
        # A warm turn's conversation is held for the next turn: background questions (flash answers,
        # the ready position) wait for that turn (or new data) rather than replace it.
        self.warmed = False
        self.foreground: str | None = None  # the foreground request on it ("turn", "generate")
        self.background: Any = None  # the background Run in flight, if any (cancellable)
        self.warm: Any = None  # the warm turn's Run in flight, if any
        self.lock = asyncio.Lock()
        self.subscribers: set[asyncio.Queue] = set()
        self.worker: asyncio.Task | None = None  # background work (ingest, flash answers)
        self.deleted = False

    # ---- tokens ------------------------------------------------------------------------
    @property
    def has_data(self) -> bool:
        return bool(self.entries)

    def entry_ids(self) -> list[int]:
        return [t for e in self.entries for t in e.tokens]

    def data_section(self) -> list[int]:
        return self.layout.prefix + self.entry_ids() if self.entries else []

    def durable_tokens(self) -> list[int]:
        """The data section, then the conversation (when it was rendered the way the data is now)."""
        tokens = self.data_section()
        if self.conversation is not None and self.data_mode == self.has_data:
            tokens += self.conversation
        return tokens

    @property
    def data_end(self) -> int:
        n = len(self.layout.prefix) + sum(len(e.tokens) for e in self.entries) if self.entries else 0
        if self.conversation is not None and self.data_mode == self.has_data:
            n += len(self.conversation)
        return n

    def diverged(self, ids: list[int]) -> int:
        """The engine now holds `ids` (a warm turn's prompt): where they part from the durable
        conversation, the conversation keeps only the common part (journaled). The data version."""
        keep = common_prefix(ids, self.durable_tokens()) - len(self.data_section())
        if self.conversation is not None and self.data_mode == self.has_data and 0 <= keep < len(self.conversation):
            self.conversation = self.conversation[:keep]
            self.chat = None
            self.data_version += 1
            self.journal.turn(self.id, self.conversation, self.data_mode, self.turns, self.data_version)
            self.data_updated()
        return self.data_version

    def held(self, out) -> None:
        """Mirror what the engine holds after one of this session's requests ended."""
        if out.session_token_ids is not None:
            self.tokens = len(out.session_token_ids)
            self.kv_tokens = out.session_kv_tokens or 0

    # ---- the object clients see -----------------------------------------------------------
    def touch(self) -> None:
        self.last_used = time.time()

    @property
    def busy(self) -> bool:
        return self.foreground is not None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "object": "session", "created": self.created_ms // 1000, "last_used": int(self.last_used),
            "tokens": self.tokens, "kv_tokens": self.kv_tokens, "busy": self.busy, "turns": self.turns,
            "data_end": self.data_end, "data_version": self.data_version, "pending": len(self.pending),
            "pre_decode": self.pre_decode, "ready": self.ready_token is not None, "evicted": self.evicted,
        }
        if self.window is not None:
            body["window"] = self.window
        if self.ready_token is not None:
            body["ready_token"] = self.ready_token
            body["ready_gap"] = self.ready_gap
        return body

    def idle_since(self) -> float | None:
        """When it became idle, or None while anything is on it (requests, data, streams)."""
        if self.busy or self.pending or self.subscribers or self.lock.locked() or self.warm is not None:
            return None
        return self.last_used

    # ---- push --------------------------------------------------------------------------
    def push(self, entries: list[str]) -> dict[str, Any]:
        """Queue entries for ingestion (journaled first); drop the oldest pending past the bound."""
        self.touch()
        self.journal.push(self.id, entries)
        self.total_pushed += len(entries)
        self.pending.extend(entries)
        self.pending_bytes += sum(len(t.encode()) for t in entries)
        dropped = 0
        while self.pending and (len(self.pending) > self.limits.max_pending_entries
                                or self.pending_bytes > self.limits.max_pending_bytes):
            self.pending_bytes -= len(self.pending.popleft().encode())
            dropped += 1
        if dropped:
            self.journal.drop(self.id, dropped)
            self.total_dropped += dropped
        return {"pushed": len(entries), "dropped": dropped,
                "pending": len(self.pending), "pending_bytes": self.pending_bytes, "total_pushed": self.total_pushed,
                "total_dropped": self.total_dropped, "data_version": self.data_version}

    def take_pending(self, max_bytes: int) -> list[str]:
        """The next batch to ingest (at least one entry)."""
        batch: list[str] = []
        size = 0
        while self.pending and (not batch or size + len(self.pending[0].encode()) <= max_bytes):
            text = self.pending.popleft()
            size += len(text.encode())
            batch.append(text)
        self.pending_bytes -= size
        return batch

    def evict_to_window(self, window: int) -> int:
        """Past `window` tokens of data, drop the oldest entries down to three quarters of it (so a
        front eviction, which moves every position, is paid once per quarter window)."""
        total = sum(len(e.tokens) for e in self.entries)
        if total <= window:
            return 0
        target = window * 3 // 4
        evicted = 0
        # the newest entry stays unless it alone is larger than the window (it cannot be held)
        while self.entries and total > target and (len(self.entries) > 1 or total > window):
            total -= len(self.entries.popleft().tokens)
            evicted += 1
        self.evicted += evicted
        return evicted

    # ---- flash queries -----------------------------------------------------------------
    def add_flash(self, query: str, max_tokens: int) -> FlashQuery:
        if any(f.query == query for f in self.flash.values()):
            raise ConflictError(f"Session '{self.id}' already has the flash query {query!r}.", "query",
                                "duplicate_flash_query")
        if len(self.flash) >= self.limits.max_flash:
            raise ConflictError(f"Session '{self.id}' has {len(self.flash)} flash queries, the most a session "
                                f"may have; delete one first.", "query", "too_many_flash_queries")
        fq = FlashQuery(self.next_flash_id, query, max(1, min(max_tokens, self.limits.max_flash_tokens)))
        self.journal.flash_add(self.id, fq.id, fq.query, fq.max_tokens)
        self.next_flash_id += 1
        self.flash[fq.id] = fq
        return fq

    def remove_flash(self, fid: int) -> bool:
        if fid not in self.flash:
            return False
        self.journal.flash_remove(self.id, fid)
        del self.flash[fid]
        return True

    def flash_records(self) -> list[FlashRecord]:
        return [FlashRecord(f.id, f.query, f.max_tokens) for f in self.flash.values()]

    # ---- events ------------------------------------------------------------------------
    def publish(self, kind: str, data: dict[str, Any]) -> None:
        for queue in list(self.subscribers):
            if queue.full():  # too far behind: its stream ends, the client resyncs from `connected`
                self.subscribers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)
            else:
                queue.put_nowait((kind, data))

    def data_updated(self) -> None:
        self.publish("data_updated", {"data_version": self.data_version, "tokens": self.tokens,
                                      "pending": len(self.pending)})

    def connected(self) -> dict[str, Any]:
        return {"session_id": self.id, "data_version": self.data_version, "flash_queries": len(self.flash)}

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue]:
        """A queue of (kind, data) events; None when the stream must end (deleted, behind)."""
        queue: asyncio.Queue = asyncio.Queue(EVENT_QUEUE)
        self.subscribers.add(queue)
        try:
            yield queue
        finally:
            self.subscribers.discard(queue)
            self.touch()

    def close_subscribers(self) -> None:
        for queue in list(self.subscribers):
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)
        self.subscribers.clear()

    # ---- who is on it ------------------------------------------------------------------
    @asynccontextmanager
    async def foreground_work(self, kind: str) -> AsyncIterator[None]:
        """Run foreground work on the session: 409 when some is in flight already; background
        work (and a warm turn) gives way at its next step."""
        self.claim(kind)
        try:
            await self.take_lock()
            try:
                yield
            finally:
                self.lock.release()
        finally:
            self.release(kind)

    def check_free(self) -> None:
        """409 while a foreground request (a turn, a question) is in flight on it."""
        if self.foreground is not None:
            raise ConflictError(f"Session '{self.id}' is busy: a {self.foreground} is in flight on it. "
                                f"Wait for it to finish.", None, "session_busy")

    def claim(self, kind: str) -> None:
        self.check_free()
        self.foreground = kind
        self.touch()

    async def take_lock(self) -> None:
        for run in (self.background, self.warm):
            if run is not None:
                run.cancel()
        await self.lock.acquire()

    def release(self, kind: str) -> None:
        if self.foreground == kind:
            self.foreground = None
        self.touch()
