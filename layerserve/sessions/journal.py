"""Durable sessions: one append-only JSON-lines journal per session, replayed at start-up.

"Nothing acked is lost, even by a crash": every acked push and every finished turn is appended to
its session's journal before the answer goes out. Each record is one line written with a single
os.write() on an O_APPEND descriptor, so once the call returns the bytes are in the kernel and
survive a SIGKILL of the server (not a power cut: records are fsync'ed only with `fsync=True`).
A kill therefore loses only what was never acked: at worst a partial last line, which restore
ignores.

Layout: `<dir>/<session_id>.jsonl`, one compact JSON object per line, field "op":

    snapshot             the full SessionRecord (fields flattened); replay starts from it
    create               id, created_ms, window, pre_decode (a fresh session)
    push                 entries: appended to the entry stream, each with the next sequence number
    drop                 count: the `count` oldest pending entries were dropped (queue overflow)
    ingest               count, evicted, data_version: the next `count` pending entries became
                         durable, then the `evicted` oldest durable ones left the sliding window
    turn                 conversation, data_mode, turns, data_version
    forget_conversation  the conversation section was dropped
    flash_add            fid, query, max_tokens
    flash_remove         fid

Journal.create() writes a `snapshot` line; restore() replays every file and compacts it into a
single `snapshot` line (temp file + os.replace), so a journal never grows past one restart's worth
of records. A corrupt line other than the last makes that one session unrestorable: its file is
renamed to `<id>.jsonl.corrupt` (kept for inspection) and the other sessions are restored.

The journal keeps a few counters per open session (pending/durable lengths, flash ids) and refuses
a record that replay would reject (ValueError, nothing written), so a caller's bookkeeping bug
cannot make a journal unrestorable.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("layerserve.sessions")

SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
SUFFIX = ".jsonl"
CORRUPT_SUFFIX = ".jsonl.corrupt"
TMP_SUFFIX = ".jsonl.tmp"
LOCK_SUFFIX = ".lock"
OWNER_READS = 5


class OwnedElsewhere(Exception):
    """The session's journal is locked by another owner (a replica sharing the directory)."""

    def __init__(self, sid: str, owner: str) -> None:
        super().__init__(f"session {sid!r} is held by {owner or 'another process'}")
        self.sid = sid
        self.owner = owner


@dataclass(frozen=True, slots=True)
class FlashRecord:
    fid: int
    query: str
    max_tokens: int


@dataclass(slots=True)
class SessionRecord:
    """A session's state as replayed from its journal."""

    id: str
    created_ms: int
    window: int | None = None
    pre_decode: bool = False
    durable: list[str] = field(default_factory=list)  # ingested, not evicted; oldest first
    pending: list[str] = field(default_factory=list)  # pushed, not dropped, not ingested; oldest first
    evicted: int = 0  # durable entries evicted by the sliding window, cumulative
    total_pushed: int = 0
    total_dropped: int = 0
    data_version: int = 0
    conversation: list[int] | None = None
    data_mode: bool = False
    turns: int = 0
    flash: list[FlashRecord] = field(default_factory=list)  # in fid order
    next_flash_id: int = 1  # 1 + the highest fid ever added

    @property
    def first_pending_seq(self) -> int:
        """Sequence number of pending[0] (pending is always the newest tail of the stream)."""
        return self.total_pushed - len(self.pending)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SessionRecord:
        flash = [FlashRecord(_int(f, "fid"), _str(f, "query"), _int(f, "max_tokens")) for f in _list(d, "flash")]
        conv = d.get("conversation")
        rec = cls(
            id=_session_id(d.get("id")),
            created_ms=_int(d, "created_ms"),
            window=None if d.get("window") is None else _int(d, "window"),
            pre_decode=_bool(d, "pre_decode"),
            durable=_str_list(d, "durable"),
            pending=_str_list(d, "pending"),
            evicted=_nonneg(d, "evicted"),
            total_pushed=_nonneg(d, "total_pushed"),
            total_dropped=_nonneg(d, "total_dropped"),
            data_version=_int(d, "data_version"),
            conversation=None if conv is None else _int_list(d, "conversation"),
            data_mode=_bool(d, "data_mode"),
            turns=_nonneg(d, "turns"),
            flash=flash,
            next_flash_id=_int(d, "next_flash_id"),
        )
        _check(rec)
        return rec


# ---- replay ------------------------------------------------------------------------------


def replay(lines: Iterable[dict[str, Any]]) -> SessionRecord:
    """Apply journal records in order and return the session's state.

    The first record must be `create` or `snapshot`; a later `snapshot` restarts from itself.
    Raises ValueError on a malformed or inconsistent record (the message names its index).
    """
    rec: SessionRecord | None = None
    for i, line in enumerate(lines):
        try:
            rec = _apply(rec, line)
        except ValueError as e:
            raise ValueError(f"record {i}: {e}") from None
    if rec is None:
        raise ValueError("journal has no records")
    return rec


def _apply(rec: SessionRecord | None, r: dict[str, Any]) -> SessionRecord:
    if not isinstance(r, dict):
        raise ValueError("record is not an object")
    op = r.get("op")
    if op == "snapshot":
        return SessionRecord.from_json(r)
    if op == "create":
        if rec is not None:
            raise ValueError("create after the session's first record")
        return SessionRecord(id=_session_id(r.get("id")), created_ms=_int(r, "created_ms"),
                             window=None if r.get("window") is None else _int(r, "window"),
                             pre_decode=_bool(r, "pre_decode"))
    if rec is None:
        raise ValueError(f"{op!r} before create/snapshot")
    if op == "push":
        entries = _str_list(r, "entries")
        rec.pending.extend(entries)
        rec.total_pushed += len(entries)
    elif op == "drop":
        count = _nonneg(r, "count")
        if count > len(rec.pending):
            raise ValueError(f"drop {count} of {len(rec.pending)} pending")
        del rec.pending[:count]
        rec.total_dropped += count
    elif op == "ingest":
        count, evicted = _nonneg(r, "count"), _nonneg(r, "evicted")
        if count > len(rec.pending):
            raise ValueError(f"ingest {count} of {len(rec.pending)} pending")
        if evicted > len(rec.durable) + count:
            raise ValueError(f"evict {evicted} of {len(rec.durable) + count} durable")
        rec.durable.extend(rec.pending[:count])
        del rec.pending[:count]
        del rec.durable[:evicted]
        rec.evicted += evicted
        rec.data_version = _int(r, "data_version")
    elif op == "turn":
        rec.conversation = _int_list(r, "conversation")
        rec.data_mode = _bool(r, "data_mode")
        rec.turns = _nonneg(r, "turns")
        rec.data_version = _int(r, "data_version")
    elif op == "forget_conversation":
        rec.conversation = None
    elif op == "flash_add":
        fid = _int(r, "fid")
        if any(f.fid == fid for f in rec.flash):
            raise ValueError(f"flash {fid} added twice")
        rec.flash.append(FlashRecord(fid, _str(r, "query"), _int(r, "max_tokens")))
        rec.flash.sort(key=lambda f: f.fid)
        rec.next_flash_id = max(rec.next_flash_id, fid + 1)
    elif op == "flash_remove":
        fid = _int(r, "fid")
        kept = [f for f in rec.flash if f.fid != fid]
        if len(kept) == len(rec.flash):
            raise ValueError(f"flash {fid} removed but not present")
        rec.flash = kept
    else:
        raise ValueError(f"unknown op {op!r}")
    return rec


def _check(rec: SessionRecord) -> None:
    if rec.total_pushed != len(rec.durable) + len(rec.pending) + rec.evicted + rec.total_dropped:
        raise ValueError("total_pushed != durable + pending + evicted + total_dropped")
    fids = [f.fid for f in rec.flash]
    if fids != sorted(set(fids)):
        raise ValueError("flash ids not unique and ascending")
    if fids and rec.next_flash_id <= fids[-1]:
        raise ValueError("next_flash_id not above the highest flash id")


# Field readers (ValueError on a bad field). bool is an int subclass, hence `type(v) is int`.
def _get(d: Any, key: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"missing field {key!r}")
    return d[key]


def _int(d: Any, key: str) -> int:
    v = _get(d, key)
    if type(v) is not int:
        raise ValueError(f"field {key!r} is not an int")
    return v


def _nonneg(d: Any, key: str) -> int:
    v = _int(d, key)
    if v < 0:
        raise ValueError(f"field {key!r} is negative")
    return v


def _bool(d: Any, key: str) -> bool:
    v = _get(d, key)
    if type(v) is not bool:
        raise ValueError(f"field {key!r} is not a bool")
    return v


def _str(d: Any, key: str) -> str:
    v = _get(d, key)
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} is not a string")
    return v


def _list(d: Any, key: str) -> list[Any]:
    v = _get(d, key)
    if not isinstance(v, list):
        raise ValueError(f"field {key!r} is not a list")
    return v


def _str_list(d: Any, key: str) -> list[str]:
    v = _list(d, key)
    if not all(isinstance(x, str) for x in v):
        raise ValueError(f"field {key!r} is not a list of strings")
    return list(v)


def _int_list(d: Any, key: str) -> list[int]:
    v = _list(d, key)
    if not all(type(x) is int for x in v):
        raise ValueError(f"field {key!r} is not a list of ints")
    return list(v)


def _session_id(sid: Any) -> str:
    if not isinstance(sid, str) or not SESSION_ID_RE.fullmatch(sid):
        raise ValueError(f"invalid session id {sid!r}")
    return sid


def _encode(record: dict[str, Any]) -> bytes:
    # ensure_ascii: a lone surrogate from a client's JSON still encodes; no raw newline can occur.
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


# ---- the journal -------------------------------------------------------------------------


@dataclass(slots=True)
class _Open:
    """An open session file, and what is needed to refuse records replay would reject."""

    fd: int
    size: int  # bytes written so far: a failed append is truncated back to it
    pending: int
    durable: int
    flash: set[int]


class Journal:
    """Per-session append-only journals in one directory. Thread-safe.

    With `owner` (a replica's name, when replicas share the directory), a session is open in one
    Journal at a time: create() and adopt() take an exclusive flock on `<id>.lock` and write the
    owner's name into it, and the lock is released by delete(), close() or the process's death
    (the kernel drops it on SIGKILL too), so a dead replica's sessions can be adopted at once."""

    def __init__(self, directory: pathlib.Path, fsync: bool = False, owner: str | None = None) -> None:
        self.directory = pathlib.Path(directory)
        self.fsync = fsync
        self.owner = owner
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._owned: dict[str, int] = {}  # session id -> the fd holding its flock (with `owner`)

    def path(self, sid: str) -> pathlib.Path:
        return self.directory / (_session_id(sid) + SUFFIX)

    # ---- writing --------------------------------------------------------------------------
    def create(self, rec: SessionRecord) -> None:
        """Start a session's journal with a snapshot of `rec`. FileExistsError if it has one."""
        snapshot = rec.to_json()
        SessionRecord.from_json(snapshot)  # the checks replay will apply (ValueError)
        data = _encode({"op": "snapshot", **snapshot})
        path = self.path(rec.id)
        with self._lock:
            held = rec.id in self._owned  # already ours (adopted): a failed create must not drop it
            self._take(rec.id)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except BaseException:
                if not held:
                    self._release(rec.id)
                raise
            st = _Open(fd, 0, len(rec.pending), len(rec.durable), {f.fid for f in rec.flash})
            try:
                self._write(st, data)
                if self.fsync:
                    self._fsync_dir()
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                if not held:
                    self._release(rec.id)
                raise
            self._open[rec.id] = st

    def push(self, sid: str, entries: Sequence[str]) -> None:
        entries = list(entries)
        if not all(isinstance(e, str) for e in entries):
            raise TypeError("entries must be strings")
        with self._lock:
            st = self._session(sid)
            self._write(st, _encode({"op": "push", "entries": entries}))
            st.pending += len(entries)

    def drop(self, sid: str, count: int) -> None:
        _check_count(count, "count")
        with self._lock:
            st = self._session(sid)
            if count > st.pending:
                raise ValueError(f"drop {count} of {st.pending} pending entries")
            self._write(st, _encode({"op": "drop", "count": count}))
            st.pending -= count

    def ingest(self, sid: str, count: int, evicted: int, data_version: int) -> None:
        _check_count(count, "count")
        _check_count(evicted, "evicted")
        _check_int(data_version, "data_version")
        with self._lock:
            st = self._session(sid)
            if count > st.pending:
                raise ValueError(f"ingest {count} of {st.pending} pending entries")
            if evicted > st.durable + count:
                raise ValueError(f"evict {evicted} of {st.durable + count} durable entries")
            self._write(st, _encode({"op": "ingest", "count": count, "evicted": evicted,
                                     "data_version": data_version}))
            st.pending -= count
            st.durable += count - evicted

    def turn(self, sid: str, conversation: Sequence[int], data_mode: bool, turns: int, data_version: int) -> None:
        conversation = list(conversation)
        if not all(type(t) is int for t in conversation):
            raise TypeError("conversation must be token ids (ints)")
        if type(data_mode) is not bool:
            raise TypeError("data_mode must be a bool")
        _check_count(turns, "turns")
        _check_int(data_version, "data_version")
        with self._lock:
            st = self._session(sid)
            self._write(st, _encode({"op": "turn", "conversation": conversation, "data_mode": data_mode,
                                     "turns": turns, "data_version": data_version}))

    def forget_conversation(self, sid: str) -> None:
        with self._lock:
            self._write(self._session(sid), _encode({"op": "forget_conversation"}))

    def flash_add(self, sid: str, fid: int, query: str, max_tokens: int) -> None:
        _check_int(fid, "fid")
        _check_int(max_tokens, "max_tokens")
        if not isinstance(query, str):
            raise TypeError("query must be a string")
        with self._lock:
            st = self._session(sid)
            if fid in st.flash:
                raise ValueError(f"flash {fid} already present")
            self._write(st, _encode({"op": "flash_add", "fid": fid, "query": query, "max_tokens": max_tokens}))
            st.flash.add(fid)

    def flash_remove(self, sid: str, fid: int) -> None:
        _check_int(fid, "fid")
        with self._lock:
            st = self._session(sid)
            if fid not in st.flash:
                raise ValueError(f"flash {fid} not present")
            self._write(st, _encode({"op": "flash_remove", "fid": fid}))
            st.flash.discard(fid)

    def delete(self, sid: str) -> None:
        """Close and remove a session's journal; a session without one is fine."""
        path = self.path(sid)
        with self._lock:
            st = self._open.pop(sid, None)
            if st is not None:
                os.close(st.fd)
            path.unlink(missing_ok=True)
            if sid in self._owned:
                self._lock_path(sid).unlink(missing_ok=True)
                self._release(sid)
            if self.fsync:
                self._fsync_dir()

    def close(self) -> None:
        with self._lock:
            self._close_all()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- restoring ------------------------------------------------------------------------
    def adopt(self, sid: str) -> SessionRecord | None:
        """One session from its journal, locked to this owner and compacted, or None when it has
        no journal (or an unrestorable one, moved aside as restore() does). OwnedElsewhere while
        another owner holds it. A session already open here is returned as its file has it."""
        with self._lock:
            if sid in self._open:
                return replay(_read_records(self.path(sid)))
            if not self.path(sid).is_file():  # no journal: no lock taken (nor a lock file left behind)
                return None
            self._take(sid)
            try:
                (self.directory / (sid + TMP_SUFFIX)).unlink(missing_ok=True)  # a compaction cut short
                rec = self._restore_file(self.path(sid))
                if rec is None:
                    self._release(sid)
                return rec
            except BaseException:
                self._release(sid)
                raise

    def restore(self) -> list[SessionRecord]:
        """Replay every journal in the directory, compact each to one snapshot line, and keep
        them open for appends. Sorted by (created_ms, id). Meant for start-up: sessions already
        open in this Journal are closed and restored from their files like the others."""
        with self._lock:
            self._close_all()
            for tmp in self.directory.glob("*" + TMP_SUFFIX):  # a compaction cut short by a crash
                tmp.unlink(missing_ok=True)
            restored = [rec for path in sorted(self.directory.glob("*" + SUFFIX))
                        if (rec := self._restore_file(path)) is not None]
            if self.fsync:
                self._fsync_dir()
        restored.sort(key=lambda r: (r.created_ms, r.id))
        return restored

    def _restore_file(self, path: pathlib.Path) -> SessionRecord | None:
        """Replay and compact one journal (kept open), or None: no file, or a corrupt one (moved aside)."""
        if not path.is_file():
            return None
        sid = path.name[: -len(SUFFIX)]
        try:
            _session_id(sid)
            rec = replay(_read_records(path))
            if rec.id != sid:
                raise ValueError(f"file holds session {rec.id!r}")
        except (ValueError, OSError) as e:
            corrupt = _free_name(self.directory / (sid + CORRUPT_SUFFIX))
            log.warning("session journal %s cannot be restored (%s); moved to %s", path, e, corrupt.name)
            os.replace(path, corrupt)
            return None
        self._compact(rec)
        return rec

    def _compact(self, rec: SessionRecord) -> None:
        path = self.path(rec.id)
        tmp = self.directory / (rec.id + TMP_SUFFIX)
        data = _encode({"op": "snapshot", **rec.to_json()})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._open[rec.id] = _Open(fd, len(data), len(rec.pending), len(rec.durable), {f.fid for f in rec.flash})

    # ---- internals --------------------------------------------------------------------------
    def _session(self, sid: str) -> _Open:
        st = self._open.get(sid)
        if st is None:
            raise KeyError(sid)
        return st

    def _write(self, st: _Open, data: bytes) -> None:
        """Append one line. Normally one os.write; a short or failed write is cut back off so the
        file never keeps a partial line in front of later records."""
        try:
            n = os.write(st.fd, data)
            if n != len(data):
                view = memoryview(data)[n:]
                while view:
                    view = view[os.write(st.fd, view):]
            if self.fsync:
                getattr(os, "fdatasync", os.fsync)(st.fd)
        except BaseException:
            try:
                os.ftruncate(st.fd, st.size)
            except OSError:
                log.exception("could not cut a failed journal append back off")
            raise
        st.size += len(data)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _close_all(self) -> None:
        for st in self._open.values():
            os.close(st.fd)
        self._open.clear()
        for sid in list(self._owned):
            self._release(sid)

    def _lock_path(self, sid: str) -> pathlib.Path:
        return self.directory / (_session_id(sid) + LOCK_SUFFIX)

    def _take(self, sid: str) -> None:
        """With an owner: lock `sid` to it (OwnedElsewhere if another holds it). Without: nothing."""
        if self.owner is None or sid in self._owned:
            return
        path = self._lock_path(sid)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner_of(fd)
                os.close(fd)
                raise OwnedElsewhere(sid, owner) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # locked a lock file that delete() unlinked meanwhile: take the current one
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.owner.encode(), 0)
        self._owned[sid] = fd

    def _release(self, sid: str) -> None:
        fd = self._owned.pop(sid, None)
        if fd is not None:
            os.close(fd)  # drops the flock


def _owner_of(fd: int) -> str:
    """The name in a lock file; read again briefly while a new owner is between truncating it and
    writing its name."""
    for _ in range(OWNER_READS):
        owner = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        if owner:
            return owner
        time.sleep(0.002)
    return ""


def _read_records(path: pathlib.Path) -> list[dict[str, Any]]:
    """A journal's records. A last line without its newline (a write cut short) or that does not
    parse is ignored: it was never acked. A bad line elsewhere raises ValueError."""
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        log.warning("session journal %s: ignoring a partial last line (%d bytes)", path, len(tail))
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            r = json.loads(line)
            if not isinstance(r, dict):
                raise ValueError("not an object")
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if i == len(lines) - 1 and not tail:
                log.warning("session journal %s: ignoring a corrupt last line (%s)", path, e)
                break
            raise ValueError(f"line {i + 1} is corrupt: {e}") from None
        records.append(r)
    return records


def _free_name(path: pathlib.Path) -> pathlib.Path:
    """`path`, or `path.1`, `path.2`, ... : the first that does not exist (an older corrupt copy stays)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _check_int(v: object, what: str) -> None:
    if type(v) is not int:
        raise TypeError(f"{what} must be an int")


def _check_count(v: object, what: str) -> None:
    _check_int(v, what)
    if v < 0:  # type: ignore[operator]
        raise ValueError(f"{what} must not be negative")
