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

A ranked list goes back to Ray: within a rank Ray's base router takes the replica with the
shortest queue that has room (probing queue lengths as it does for its power-of-two router),
earlier entries first among equals.
"""

from __future__ import annotations

import logging
from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from layerserve.cluster.affinity import CHUNK_CHARS, PrefixIndex, SessionMap, chunk_keys
from layerserve.cluster.route import Route

log = logging.getLogger("layerserve.cluster")


def route_of(pending_request: PendingRequest | None) -> Route:
    args = pending_request.args if pending_request is not None else None
    return args[0] if args and isinstance(args[0], Route) else Route()


class AffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: float = 4.0, match_threshold: float = 0.1,
                         max_prefix_keys: int = 200_000, max_sessions: int = 100_000) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.match_threshold = match_threshold
        self.prefixes = PrefixIndex(max_prefix_keys)
        self.sessions = SessionMap(max_sessions)
        self.fresh: Counter[str] = Counter()  # prompts each replica got that it had seen no prefix of

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        route = route_of(pending_request)
        by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
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
            return [sorted(candidate_replicas, key=lambda r: counts.get(r.replica_id.to_full_id_str(), 0))]
        if route.kind == "prefix" and route.prefix:
            return await self._by_prefix(route.prefix, candidate_replicas, by_id)
        return [candidate_replicas]

    async def _by_prefix(self, text: str, candidates: list[RunningReplica],
                         by_id: dict[str, RunningReplica]) -> list[list[RunningReplica]]:
        keys = chunk_keys(text)
        matched, holders = self.prefixes.match(keys, by_id)
        fewest_fresh = sorted(candidates, key=lambda r: self.fresh[r.replica_id.to_full_id_str()])
        if not holders or matched * CHUNK_CHARS < self.match_threshold * len(text):
            return [fewest_fresh]
        queues = await self._queue_lens(candidates)
        best = [by_id[h] for h in sorted(holders)]
        if queues and min(queues.get(r.replica_id, 0) for r in best) - min(queues.values()) > self.imbalance_threshold:
            return [sorted(candidates, key=lambda r: queues.get(r.replica_id, 0))]
        return [best, [r for r in fewest_fresh if r not in best]]

    async def _queue_lens(self, candidates: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Each candidate's queue length: from Ray's cache, probing those it has none for."""
        cache = self.replica_queue_len_cache
        lens: dict[ReplicaID, int] = {}
        missing = []
        for r in candidates:
            n = cache.get(r.replica_id)
            if n is None:
                missing.append(r)
            else:
                lens[r.replica_id] = n
        if missing:
            for r, n in await self._probe_queue_lens(missing, 0):
                if n is not None:
                    lens[r.replica_id] = n
        return lens

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        route = route_of(pending_request)
        replica = replica_id.to_full_id_str()
        if route.kind in ("session", "place") and route.session_id:
            self.sessions.set(route.session_id, replica)
        elif route.kind == "prefix" and route.prefix:
            keys = chunk_keys(route.prefix)
            if self.prefixes.match(keys, (replica,))[0] * CHUNK_CHARS < self.match_threshold * len(route.prefix):
                self.fresh[replica] += 1
            self.prefixes.insert(keys, replica)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self.prefixes.remove(replica_id.to_full_id_str())
            self.fresh.pop(replica_id.to_full_id_str(), None)
