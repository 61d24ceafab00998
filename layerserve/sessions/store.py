"""The live sessions of one server: create, look up, list, delete, expire, restore. Sessions are
restored from their journals at start-up (their KV is recomputed on first use: the engine holds
nothing for them until a request runs on one). A replica of a cluster, whose journal has an
owner, restores none at start-up: it adopts a session from the shared directory when a request
first names it (`adopt`), and the journal's lock keeps two replicas from both holding it. A
session nobody names for `ttl` seconds is deleted as DELETE would delete it, never while a
request, pending data or an event stream is on it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import Any

from layerserve.api.errors import ConflictError, InvalidRequestError, NotFoundError
from layerserve.api.state import Runtime
from layerserve.sessions.context import data_layout, entry_tokens
from layerserve.sessions.journal import Journal, OwnedElsewhere, SessionRecord
from layerserve.sessions.session import Limits, Session
from layerserve.sessions.work import SessionWork

log = logging.getLogger("layerserve.sessions")

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
DELETE_WAIT_S = 2.0  # how long DELETE waits for background work on the session to give way


def check_id(session_id: str) -> str:
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidRequestError("A session id is 1-128 characters of A-Z, a-z, 0-9, '_' and '-'.", "id",
                                  "invalid_session_id")
    return session_id


class SessionStore:
    def __init__(self, rt: Runtime, journal: Journal, *, max_sessions: int, ttl: float, metrics=None,
                 limits: Limits | None = None) -> None:
        self.rt = rt
        self.journal = journal
        self.max_sessions = max_sessions
        self.ttl = ttl
        self.limits = limits or Limits()
        self.layout = data_layout(rt)
        self.work = SessionWork(rt, metrics)
        self.sessions: dict[str, Session] = {}
        self._adopting: dict[str, asyncio.Future] = {}  # session id -> its adoption in flight
        self._reaper: asyncio.Task | None = None

    # ---- start and stop ----------------------------------------------------------------
    def restore(self) -> int:
        """Sessions from their journals (on a prep thread: tokenizing their data); none for a
        replica (they are adopted on first use)."""
        if self.journal.owner is not None:
            return 0
        restored = 0
        for rec in self.journal.restore():
            self._add(rec)
            restored += 1
        return restored

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for session in self.sessions.values():
            self.rt.engine.open_session(session.id)
            if session.pending or session.flash:
                self.work.wake(session)
        self._reaper = loop.create_task(self._reap())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for session in self.sessions.values():
            session.close_subscribers()
            if session.worker is not None:
                session.worker.cancel()
        self.journal.close()

    async def adopt(self, session_id: str) -> bool:
        """Make a session held in the shared directory live here, if it is not yet; True when it is
        live now. OwnedElsewhere while another replica holds it. For replicas only."""
        if session_id in self.sessions or self.journal.owner is None or not SESSION_ID.fullmatch(session_id):
            return session_id in self.sessions
        if session_id in self._adopting:  # one adoption per session: the others wait for it
            return await asyncio.shield(self._adopting[session_id])
        done = self._adopting[session_id] = asyncio.get_running_loop().create_future()
        try:
            live = await self._adopt(session_id)
        except BaseException as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: the waiters (if any) get it too
            raise
        else:
            done.set_result(live)
            return live
        finally:
            del self._adopting[session_id]

    async def _adopt(self, session_id: str) -> bool:
        if len(self.sessions) >= self.max_sessions:
            raise ConflictError(f"This replica holds {len(self.sessions)} live sessions, its limit (--max-sessions "
                                f"{self.max_sessions}); session '{session_id}' cannot be restored here now.", None,
                                "too_many_sessions")
        session = await self.rt.offload(self._adopted, session_id)
        if session is None:
            return False
        self.sessions[session_id] = session
        self.rt.engine.open_session(session.id)
        if session.pending or session.flash:
            self.work.wake(session)
        log.info("session %s adopted from %s", session_id, self.journal.directory)
        return True

    def _adopted(self, session_id: str) -> Session | None:
        rec = self.journal.adopt(session_id)
        return None if rec is None else self._session(rec)

    def _add(self, rec: SessionRecord) -> Session:
        session = self.sessions[rec.id] = self._session(rec)
        return session

    def _session(self, rec: SessionRecord) -> Session:
        return Session(rec, self.layout, self.journal, self.limits, lambda text: entry_tokens(self.rt, text))

    # ---- lifecycle ---------------------------------------------------------------------
    def create(self, session_id: str | None, window: int | None, pre_decode: bool) -> Session:
        if session_id is None:
            session_id = "sess_" + secrets.token_hex(12)
        check_id(session_id)
        if session_id in self.sessions:
            raise ConflictError(f"A session with id '{session_id}' exists already.", "id", "session_exists")
        if len(self.sessions) >= self.max_sessions:
            raise ConflictError(f"The server holds {len(self.sessions)} live sessions, its limit "
                                f"(--max-sessions {self.max_sessions}); delete one first.", None, "too_many_sessions")
        core = self.rt.engine.core
        if core.session_room(session_id) <= 0:  # what a session may count on, beside one request's worth
            raise ConflictError(f"The KV pool is full: sessions hold {core.held_blocks() * core.kv.block_size} of its "
                                f"{core.kv.num_blocks * core.kv.block_size} token slots. Delete sessions or start the "
                                f"server with a larger --kv-cache-memory.", None, "kv_pool_full")
        rec = SessionRecord(session_id, int(time.time() * 1000), window, pre_decode)
        try:
            self.journal.create(rec)
        except (FileExistsError, OwnedElsewhere):  # a replica sharing the directory holds it
            raise ConflictError(f"A session with id '{session_id}' exists already.", "id", "session_exists") from None
        session = self._add(rec)
        self.rt.engine.open_session(session_id)
        return session

    def get(self, session_id: str, *, touch: bool = True) -> Session:
        check_id(session_id)
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFoundError(f"Session '{session_id}' not found.", "session_id", "session_not_found")
        if touch:
            session.touch()
        return session

    def check_entries(self, session: Session, entries: list[str]) -> list[str]:
        """Entries to push, or a 400 for one that can never fit the session's window (a token
        covers at most `max_token_bytes` bytes, so a text needs at least len // that many)."""
        window = self.work.window(session)
        for i, text in enumerate(entries):
            if len(text) // self.rt.max_token_bytes > window:
                raise InvalidRequestError(f"Entry {i} takes at least {len(text) // self.rt.max_token_bytes} tokens, "
                                          f"more than the session's window of {window}; split it into smaller "
                                          f"entries.", "data", "entry_too_long")
        return entries

    def list(self) -> list[Session]:
        return sorted(self.sessions.values(), key=lambda s: (s.created_ms, s.id))

    async def delete(self, session_id: str) -> Session:
        session = self.get(session_id)
        session.check_free()
        self._remove(session)
        if session.worker is not None and not session.worker.done():
            try:
                await asyncio.wait_for(asyncio.shield(session.worker), DELETE_WAIT_S)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                session.worker.cancel()
        return session

    def _remove(self, session: Session) -> None:
        session.deleted = True
        self.sessions.pop(session.id, None)
        for run in (session.background, session.warm):
            if run is not None:
                run.cancel()
        session.close_subscribers()
        self.rt.engine.close_session(session.id)  # the engine frees its KV (when its request ends)
        self.journal.delete(session.id)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self.ttl / 4)))
            now = time.time()
            for session in list(self.sessions.values()):
                idle = session.idle_since()
                if idle is not None and now - idle > self.ttl:
                    log.info("session %s expired after %.0fs idle", session.id, now - idle)
                    self.work.counters.expired += 1
                    self._remove(session)

    # ---- what the server shows ---------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions), **self.work.counters.as_dict()}

    def metrics(self):
        """Session gauges and counters for /metrics."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        live = list(self.sessions.values())
        yield GaugeMetricFamily("layerserve:sessions", "Live sessions", value=len(live))
        yield GaugeMetricFamily("layerserve:sessions_busy", "Sessions with a turn or question in flight",
                                value=sum(s.busy for s in live))
        yield GaugeMetricFamily("layerserve:session_pending_entries", "Pushed entries not yet ingested",
                                value=sum(len(s.pending) for s in live))
        yield GaugeMetricFamily("layerserve:session_event_streams", "Open session event streams and sockets",
                                value=sum(len(s.subscribers) for s in live))
        c = self.work.counters
        counters = {
            "session_turns": ("Chat turns run in sessions", c.turns),
            "session_cached_tokens": ("Prompt tokens session turns resumed from held KV", c.cached_tokens),
            "session_ingested_tokens": ("Tokens of pushed data ingested", c.ingested_tokens),
            "session_warm_turns": ("Warm turns run", c.warm_turns),
            "session_warmed_tokens": ("Tokens whose KV warm turns computed", c.warmed_tokens),
            "session_flash_hits": ("Questions answered from the flash cache", c.flash_hits),
            "session_flash_answers": ("Flash queries answered in the background", c.flash_answers),
            "session_ready_exits": ("Questions answered by the speculative ready-position exit", c.ready_exits),
            "sessions_expired": ("Sessions deleted after sitting unused for --session-ttl", c.expired),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"layerserve:{name}", doc, value=value)
