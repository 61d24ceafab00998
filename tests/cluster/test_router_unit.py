"""layerserve.cluster.router.AffinityRouter's choices, without Ray Serve running.

The router is built with `__new__` and `initialize_state`, and given only what `choose_replicas`
reads: a ReplicaQueueLengthCache, an async `_probe_queue_lens` stub, fake replicas carrying real
ReplicaIDs, and stand-in pending requests whose `.args[0]` is the Route. This stands in for Ray's
wiring (the RequestRouter constructor, the probing, the replica set); tests/cluster/test_cluster.py
runs the real thing in a Ray Serve app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("ray")

from ray.serve._private.common import DeploymentID, ReplicaID  # noqa: E402
from ray.serve._private.request_router.common import ReplicaQueueLengthCache  # noqa: E402

from layerserve.cluster.affinity import CHUNK_CHARS  # noqa: E402
from layerserve.cluster.route import Route, prompt_text  # noqa: E402
from layerserve.cluster.router import AffinityRouter, route_of  # noqa: E402

DEPLOYMENT = DeploymentID(name="engine", app_name="app")


@dataclass(eq=False)
class FakeReplica:
    replica_id: ReplicaID


@dataclass
class FakePending:
    """Stands in for PendingRequest, of which route_of reads only .args."""

    args: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


def replica(unique: str) -> FakeReplica:
    return FakeReplica(ReplicaID(unique_id=unique, deployment_id=DEPLOYMENT))


def rid(r: FakeReplica) -> str:
    return r.replica_id.to_full_id_str()


class Router:
    """An AffinityRouter with a queue-length cache and a probe stub, and three replicas."""

    def __init__(self, queues: dict[str, int] | None = None, probed: dict[str, int] | None = None) -> None:
        self.a, self.b, self.c = replica("aaa"), replica("bbb"), replica("ccc")
        self.replicas = [self.a, self.b, self.c]
        self.probes: list[list[str]] = []
        router = AffinityRouter.__new__(AffinityRouter)
        router.initialize_state(imbalance_threshold=2)
        router._replica_queue_len_cache = ReplicaQueueLengthCache()
        by_unique = {r.replica_id.unique_id: r for r in self.replicas}
        for unique, n in (queues or {}).items():
            router._replica_queue_len_cache.update(by_unique[unique].replica_id, n)

        async def probe(candidates, backoff_index):
            self.probes.append([r.replica_id.unique_id for r in candidates])
            return [(r, (probed or {}).get(r.replica_id.unique_id)) for r in candidates]

        router._probe_queue_lens = probe
        self.router = router

    async def choose(self, route: Route | None, candidates: list[FakeReplica] | None = None) -> list[list[str]]:
        pending = None if route is None else FakePending([route, b"body"])
        ranks = await self.router.choose_replicas(self.replicas if candidates is None else candidates, pending)
        return [[r.replica_id.unique_id for r in rank] for rank in ranks]

    def routed(self, route: Route, to: FakeReplica) -> None:
        self.router.on_request_routed(FakePending([route]), to.replica_id, None)


def chat(*contents: str) -> str:
    roles = ["user", "assistant"]
    return prompt_text({"messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]})


LONG_Q = "Tell me everything about the history of the printing press, " * 8  # several chunks
LONG_A = "The printing press was invented in the fifteenth century by " * 8


def test_replica_ids_are_ray_full_ids():
    assert rid(replica("aaa")).endswith("app#engine#aaa")


def test_route_of_reads_the_first_argument():
    assert route_of(FakePending([Route("rank", rank=2)])) == Route("rank", rank=2)
    assert route_of(FakePending(["not a route"])) == Route()
    assert route_of(FakePending([])) == Route()
    assert route_of(None) == Route()


async def test_no_candidates_no_ranks():
    assert await Router().router.choose_replicas([], FakePending([Route()])) == []


async def test_pinned_route_goes_to_the_pin():
    r = Router()
    assert await r.choose(Route("prefix", prefix=LONG_Q, pin=rid(r.b))) == [["bbb"]]
    r.routed(Route("session", session_id="s1"), r.a)
    assert await r.choose(Route("session", session_id="s1", pin=rid(r.c))) == [["ccc"]]
    # a pin that is not among the candidates is ignored: the session's replica instead
    assert await r.choose(Route("session", session_id="s1", pin=rid(r.c)), [r.a, r.b]) == [["aaa"]]


async def test_rank_route_is_the_rank_th_replica_by_id():
    r = Router()
    shuffled = [r.c, r.a, r.b]
    assert [await r.choose(Route("rank", rank=i), shuffled) for i in range(5)] == \
        [[["aaa"]], [["bbb"]], [["ccc"]], [["aaa"]], [["bbb"]]]


async def test_known_session_goes_to_its_replica():
    r = Router()
    r.routed(Route("place", session_id="s1"), r.b)
    assert await r.choose(Route("session", session_id="s1")) == [["bbb"]]
    r.routed(Route("session", session_id="s1"), r.c)  # moved (a redirect landed it there)
    assert await r.choose(Route("session", session_id="s1")) == [["ccc"]]


async def test_unknown_session_and_place_go_to_the_fewest_sessions():
    r = Router()
    for i in range(3):
        r.routed(Route("place", session_id=f"a{i}"), r.a)
    r.routed(Route("place", session_id="c0"), r.c)
    for route in (Route("session", session_id="unknown"), Route("place", session_id="new")):
        assert await r.choose(route) == [["bbb", "ccc", "aaa"]]
    # a session whose replica is not a candidate (gone) is placed like a new one
    assert await r.choose(Route("session", session_id="a0"), [r.b, r.c]) == [["bbb", "ccc"]]


async def test_any_route_is_every_candidate():
    r = Router()
    assert await r.choose(Route("any")) == [["aaa", "bbb", "ccc"]]
    assert await r.choose(None) == [["aaa", "bbb", "ccc"]]


async def test_prefix_goes_to_the_replica_that_saw_it():
    r = Router(queues={"aaa": 1, "bbb": 0, "ccc": 0})
    first = chat(LONG_Q)
    r.routed(Route("prefix", prefix=first), r.a)
    r.routed(Route("prefix", prefix=chat("x" * (3 * CHUNK_CHARS))), r.c)  # c has seen some other text
    second = chat(LONG_Q, LONG_A, "And then?")
    assert second.startswith(first) and len(first) >= 4 * CHUNK_CHARS
    assert await r.choose(Route("prefix", prefix=second)) == [["aaa"], ["bbb", "ccc"]]
    assert r.probes == []  # every queue length was in the cache


async def test_prefix_at_the_imbalance_threshold_still_goes_to_the_holder():
    r = Router(queues={"aaa": 2, "bbb": 0, "ccc": 1})
    r.routed(Route("prefix", prefix=chat(LONG_Q)), r.a)
    assert (await r.choose(Route("prefix", prefix=chat(LONG_Q, LONG_A))))[0] == ["aaa"]


async def test_prefix_holder_with_a_long_queue_loses_to_the_shortest_queues():
    r = Router(queues={"aaa": 5, "bbb": 2, "ccc": 0})
    r.routed(Route("prefix", prefix=chat(LONG_Q)), r.a)
    assert await r.choose(Route("prefix", prefix=chat(LONG_Q, LONG_A))) == [["ccc", "bbb", "aaa"]]


async def test_queue_lengths_missing_from_the_cache_are_probed():
    r = Router(queues={"aaa": 6}, probed={"bbb": 1, "ccc": None})
    r.routed(Route("prefix", prefix=chat(LONG_Q)), r.a)
    assert await r.choose(Route("prefix", prefix=chat(LONG_Q, LONG_A))) == [["ccc", "bbb", "aaa"]]
    assert r.probes == [["bbb", "ccc"]]


async def test_unrelated_prompt_goes_to_the_replica_given_fewest_new_prefixes():
    r = Router()
    # a: one long conversation, extended twice (one new prefix, a lot of text)
    turns = [chat("a" * (6 * CHUNK_CHARS)), chat("a" * (6 * CHUNK_CHARS), LONG_A),
             chat("a" * (6 * CHUNK_CHARS), LONG_A, LONG_Q)]
    for text in turns:
        r.routed(Route("prefix", prefix=text), r.a)
    # b: three unrelated short prompts; c: two
    for ch in "bde":
        r.routed(Route("prefix", prefix=chat(ch * (2 * CHUNK_CHARS))), r.b)
    for ch in "fg":
        r.routed(Route("prefix", prefix=chat(ch * (2 * CHUNK_CHARS))), r.c)
    assert dict(r.router.fresh) == {rid(r.a): 1, rid(r.b): 3, rid(r.c): 2}
    assert r.router.prefixes.size(rid(r.a)) > r.router.prefixes.size(rid(r.b))  # a saw the most text
    assert await r.choose(Route("prefix", prefix=chat("z" * (5 * CHUNK_CHARS)))) == [["aaa", "ccc", "bbb"]]
    assert r.probes == []


async def test_unrelated_prompts_are_dealt_out_in_turn():
    r = Router()
    got = []
    for ch in "pqrstu":
        route = Route("prefix", prefix=chat(ch * (3 * CHUNK_CHARS)))
        first = (await r.choose(route))[0][0]
        got.append(first)
        r.routed(route, next(x for x in r.replicas if x.replica_id.unique_id == first))
    assert got == ["aaa", "bbb", "ccc", "aaa", "bbb", "ccc"]


async def test_a_match_too_short_for_the_prompt_counts_as_none():
    r = Router()
    r.routed(Route("prefix", prefix=chat("q" * (2 * CHUNK_CHARS))), r.a)  # a saw a short prefix
    for ch in "yw":
        r.routed(Route("prefix", prefix=chat(ch * CHUNK_CHARS)), r.b)
    # the new prompt starts with all of a's text, but that is under a tenth of it
    long = chat("q" * (2 * CHUNK_CHARS) + "r" * (40 * CHUNK_CHARS))
    assert await r.choose(Route("prefix", prefix=long)) == [["ccc", "aaa", "bbb"]]
    # and being sent it counts as a new prefix for its replica
    r.routed(Route("prefix", prefix=long), r.a)
    assert r.router.fresh[rid(r.a)] == 2


async def test_on_request_routed_records_sessions_and_prefixes():
    r = Router()
    r.routed(Route("place", session_id="s1"), r.a)
    r.routed(Route("session", session_id="s2"), r.b)
    r.routed(Route("session"), r.c)  # no id: nothing to record
    r.routed(Route("any"), r.c)
    assert r.router.sessions.counts() == {rid(r.a): 1, rid(r.b): 1}
    text = chat(LONG_Q)
    r.routed(Route("prefix", prefix=text), r.c)
    assert r.router.prefixes.size(rid(r.c)) == len(text) // CHUNK_CHARS
    assert r.router.prefixes.size(rid(r.a)) == 0
    assert dict(r.router.fresh) == {rid(r.c): 1}
    r.routed(Route("prefix", prefix=chat(LONG_Q, LONG_A)), r.c)  # extends what c saw: not new
    assert dict(r.router.fresh) == {rid(r.c): 1}
