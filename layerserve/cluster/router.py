"""`AffinityRouter`: Ray Serve's request-router API, routing each call to an engine replica by
its `Route` (the call's first argument, see route.py).

- session: the replica that holds the session; a session it does not know (or whose replica is
  gone) is placed like a new one, and the replica it lands on adopts it from the shared journal
  directory (or redirects to the replica that holds it, see ingress.py).
- place: the least-loaded replica, fewest sessions first among equal queues.
- prefix: the replica that has seen the longest prefix of the prompt's text, unless its queue is
  longer than the shortest by more than `imbalance_threshold`; no useful match (under
  `match_threshold` of the text): the replica that was given the fewest new prefixes, so
  unrelated prompts are dealt out in turn (whatever one long conversation did before).
- rank: the rank-th replica in id order (the ingress fans out over ranks).
- any: least loaded.

Load is the requests in flight that this router sent to each replica (counted from routing to
completion, so a burst of requests sees its own effect at once; streams that only wait, events and
sockets, do not count). The answer to Ray is one replica per rank, in order of preference; Ray's
base router takes the first that has room.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter  # the default, for comparison
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from layerserve.cluster.affinity import CHUNK_CHARS, PrefixIndex, SessionMap, chunk_keys
from layerserve.cluster.route import Route

log = logging.getLogger("layerserve.cluster")


SWEEP_EVERY_S = 5.0
UNROUTED_TTL_S = 60.0


@dataclass(slots=True)
class Placement:
    """Where the router counted a request: in flight (`load`) and, `fresh`, as a new prefix."""

    replica: str
    load: bool
    fresh: bool
    at: float
    routed: bool = False


def route_of(pending_request: PendingRequest | None) -> Route:
    args = pending_request.args if pending_request is not None else None
    return args[0] if args and isinstance(args[0], Route) else Route()


class AffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: float = 2.0, match_threshold: float = 0.1,
                         max_prefix_keys: int = 200_000, max_sessions: int = 100_000) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.match_threshold = match_threshold
        self.prefixes = PrefixIndex(max_prefix_keys)
        self.sessions = SessionMap(max_sessions)
        self.fresh: Counter[str] = Counter()  # prompts each replica got that it had seen no prefix of
        # requests in flight per replica, as this router sent them (exact and immediate, where Ray's
        # queue-length cache lags a burst); streams that only wait (events, sockets) do not count
        self.inflight: Counter[str] = Counter()
        # internal request id -> where it was counted. The calls one ingress request makes share its
        # id; the ingress makes them one at a time (Ray's own router needs that too), and the long
        # ones made beside others (a socket's stream) are not load
        self._placed: dict[str, Placement] = {}
        self._swept = time.monotonic()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """The ranked replicas for a request. The first choice is counted at once (in flight, and
        as holding the prompt's prefix or the session), as if the request were sent there: the
        requests of a burst are chosen before any of them is routed, and must see each other.
        on_request_routed corrects the count where Ray sent the request elsewhere."""
        if not candidate_replicas:
            return []
        route = route_of(pending_request)
        request_id = pending_request.metadata.internal_request_id if pending_request is not None else None
        if request_id is not None:
            self._unplace(request_id)  # a second try for the same request: choose without its own count
        ranks = self._choose(route, {r.replica_id.to_full_id_str(): r for r in candidate_replicas})
        if request_id is not None and ranks:
            self._place(request_id, route, ranks[0][0].replica_id.to_full_id_str())
        return ranks

    def _choose(self, route: Route, by_id: dict[str, RunningReplica]) -> list[list[RunningReplica]]:
        pinned = by_id.get(route.pin) if route.pin else None
        if pinned is not None:
            return [[pinned]]
        if route.kind == "rank":
            ordered = sorted(by_id)
            return [[by_id[ordered[route.rank % len(ordered)]]]]
        if route.kind == "session" and route.session_id:
            owner = by_id.get(self.sessions.get(route.session_id) or "")
            if owner is not None:
                return [[owner]]
        if route.kind in ("session", "place"):
            counts = self.sessions.counts()
            return self._ranked(by_id, lambda r: (self.inflight[r], counts.get(r, 0)))
        if route.kind == "prefix" and route.prefix:
            return self._by_prefix(route.prefix, by_id)
        return self._ranked(by_id, lambda r: (self.inflight[r], self.fresh[r]))

    def _by_prefix(self, text: str, by_id: dict[str, RunningReplica]) -> list[list[RunningReplica]]:
        keys = chunk_keys(text)
        matched, holders = self.prefixes.match(keys, by_id)
        if not holders or matched * CHUNK_CHARS < self.match_threshold * len(text):
            return self._ranked(by_id, lambda r: (self.inflight[r], self.fresh[r]))
        best = min(holders, key=lambda r: (self.inflight[r], r))
        if self.inflight[best] - min(self.inflight[r] for r in by_id) > self.imbalance_threshold:
            return self._ranked(by_id, lambda r: (self.inflight[r], r not in holders))
        return [[by_id[best]], *self._ranked({r: v for r, v in by_id.items() if r != best},
                                             lambda r: (r not in holders, self.inflight[r]))]

    @staticmethod
    def _ranked(by_id: dict[str, RunningReplica], key) -> list[list[RunningReplica]]:
        """One replica per rank, in order of `key` (by replica name); Ray tries them in turn."""
        return [[by_id[r]] for r in sorted(by_id, key=lambda r: (key(r), r))]

    def _place(self, request_id: str, route: Route, replica: str) -> None:
        """Count the request on `replica` (replacing an earlier count of it)."""
        self._unplace(request_id)
        fresh = False
        if route.kind in ("session", "place") and route.session_id:
            self.sessions.set(route.session_id, replica)
        elif route.kind == "prefix" and route.prefix:
            keys = chunk_keys(route.prefix)
            fresh = self.prefixes.match(keys, (replica,))[0] * CHUNK_CHARS < self.match_threshold * len(route.prefix)
            self.prefixes.insert(keys, replica)
        self.fresh[replica] += fresh
        self.inflight[replica] += route.load
        now = time.monotonic()
        self._placed[request_id] = Placement(replica, route.load, fresh, now)
        if now - self._swept > SWEEP_EVERY_S:
            self._swept = now
            self._sweep()

    def _unplace(self, request_id: str) -> None:
        """Take back a choice (the request went elsewhere, or is chosen for again)."""
        placed = self._placed.pop(request_id, None)
        if placed is not None:
            self.inflight[placed.replica] -= placed.load
            self.fresh[placed.replica] -= placed.fresh

    def _sweep(self) -> None:
        """Forget counts of requests chosen but never routed (cancelled while Ray routed them)."""
        old = time.monotonic() - UNROUTED_TTL_S
        for request_id in [r for r, p in self._placed.items() if not p.routed and p.at < old]:
            self._unplace(request_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        request_id = pending_request.metadata.internal_request_id
        replica = replica_id.to_full_id_str()
        placed = self._placed.get(request_id)
        if placed is None or placed.replica != replica:
            self._place(request_id, route_of(pending_request), replica)
        self._placed[request_id].routed = True

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        placed = self._placed.get(internal_request_id)
        # only the attempt that was routed there: a rejected attempt completes late, after its
        # retry was chosen (and counted) under the same request id
        if placed is not None and placed.routed and placed.replica == replica_id.to_full_id_str():
            del self._placed[internal_request_id]
            self.inflight[placed.replica] -= placed.load

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        names = {replica_id.to_full_id_str() for replica_id in gone}
        for name in names:
            self.prefixes.remove(name)
            self.fresh.pop(name, None)
            self.inflight.pop(name, None)
        for request_id in [r for r, p in self._placed.items() if p.replica in names]:
            del self._placed[request_id]



class PinnedPowerOfTwoRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default router (power of two choices), honouring only a Route's `pin`: the
    redirects to a session's holder and a socket's inbound messages need it. For comparison."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        pin = route_of(pending_request).pin
        pinned = [r for r in candidate_replicas if pin and r.replica_id.to_full_id_str() == pin]
        return [pinned] if pinned else await super().choose_replicas(candidate_replicas, pending_request)
