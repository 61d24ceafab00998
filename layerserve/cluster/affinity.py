"""The router's memory: which replica holds which session, and which replica has seen which
prompt prefixes (so holds their KV in its prefix cache).

Prefixes are kept as chains of hashed text chunks, as the engine keys its KV blocks: chunk i's key
hashes chunk i's text with chunk i-1's key, so a key stands for the whole prefix up to it. A
replica's match is the number of leading keys it has seen. Bounded: the least recently used keys
go first."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

CHUNK_CHARS = 64


def chunk_keys(text: str, chunk: int = CHUNK_CHARS) -> list[bytes]:
    """Chained keys of `text`'s whole chunks (a partial last chunk is not keyed)."""
    keys: list[bytes] = []
    prev = b""
    for start in range(0, len(text) - chunk + 1, chunk):
        prev = hashlib.blake2b(prev + text[start:start + chunk].encode("utf-8", "surrogatepass"),
                               digest_size=12).digest()
        keys.append(prev)
    return keys


class PrefixIndex:
    """Chunk keys -> the replicas that were sent a prompt with that prefix."""

    def __init__(self, max_keys: int = 200_000) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[bytes, set[str]] = OrderedDict()
        self._size: dict[str, int] = {}  # keys per replica

    def match(self, keys: list[bytes], replicas: Iterable[str]) -> tuple[int, set[str]]:
        """(how many leading keys the best of `replicas` have seen, those replicas)."""
        alive = set(replicas)
        matched = 0
        for key in keys:
            holders = self._keys.get(key)
            seen = alive & holders if holders else set()
            if not seen:
                break
            alive, matched = seen, matched + 1
        return matched, (alive if matched else set())

    def insert(self, keys: list[bytes], replica: str) -> None:
        for key in keys:
            holders = self._keys.get(key)
            if holders is None:
                holders = self._keys[key] = set()
            else:
                self._keys.move_to_end(key)
            if replica not in holders:
                holders.add(replica)
                self._size[replica] = self._size.get(replica, 0) + 1
        while len(self._keys) > self.max_keys:
            _, holders = self._keys.popitem(last=False)
            for r in holders:
                self._size[r] -= 1

    def size(self, replica: str) -> int:
        return self._size.get(replica, 0)

    def remove(self, replica: str) -> None:
        """Forget a replica that is gone (its cache went with it)."""
        for key in [k for k, holders in self._keys.items() if replica in holders]:
            holders = self._keys[key]
            holders.discard(replica)
            if not holders:
                del self._keys[key]
        self._size.pop(replica, None)


class SessionMap:
    """Session id -> the replica that holds it, least recently used dropped past `max_sessions`
    (a dropped one is found again by the replicas' redirect)."""

    def __init__(self, max_sessions: int = 100_000) -> None:
        self.max_sessions = max_sessions
        self._owner: OrderedDict[str, str] = OrderedDict()
        self._counts: dict[str, int] = {}

    def get(self, session_id: str) -> str | None:
        owner = self._owner.get(session_id)
        if owner is not None:
            self._owner.move_to_end(session_id)
        return owner

    def set(self, session_id: str, replica: str) -> None:
        old = self._owner.get(session_id)
        if old is not None:
            self._counts[old] -= 1
        self._owner[session_id] = replica
        self._owner.move_to_end(session_id)
        self._counts[replica] = self._counts.get(replica, 0) + 1
        while len(self._owner) > self.max_sessions:
            _, owner = self._owner.popitem(last=False)
            self._counts[owner] -= 1

    def counts(self) -> dict[str, int]:
        """Sessions per replica."""
        return dict(self._counts)
