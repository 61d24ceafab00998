"""layerserve.cluster.router.AffinityRouter's choices, without Ray Serve running.

The router is built with `__new__` and `initialize_state` and given fake replicas carrying real
ReplicaIDs and stand-in pending requests (`.args[0]` is the Route, `.metadata.internal_request_id`
names it). Its load is its own in-flight count, fed here through `on_request_routed` and
`on_request_completed` as Ray calls them. This stands in for Ray's wiring (the RequestRouter
constructor, the replica set); tests/cluster/test_cluster.py runs the real thing."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray")

from ray.serve._private.common import DeploymentID, ReplicaID  # noqa: E402

from layerserve.cluster.route import Route, prompt_text  # noqa: E402
from layerserve.cluster.router import AffinityRouter, route_of  # noqa: E402

DEPLOYMENT = DeploymentID(name="engine", app_name="app")
_ids = itertools.count()


@dataclass(eq=False)
class FakeReplica:
    replica_id: ReplicaID


@dataclass
class FakePending:
    """Stands in for PendingRequest: route_of reads .args, the in-flight count the request id."""

    args: list[Any]
    metadata: Any = field(default_factory=lambda: SimpleNamespace(internal_request_id=f"req-{next(_ids)}"))


def replica(unique: str) -> FakeReplica:
    return FakeReplica(ReplicaID(unique_id=unique, deployment_id=DEPLOYMENT))


class Router:
    """An AffinityRouter over three replicas a, b, c."""

    def __init__(self, threshold: float = 2) -> None:
        self.a, self.b, self.c = replica("aaa"), replica("bbb"), replica("ccc")
        self.replicas = [self.a, self.b, self.c]
        self.router = AffinityRouter.__new__(AffinityRouter)
        self.router.initialize_state(imbalance_threshold=threshold)

    async def choose(self, route: Route | None, candidates: list[FakeReplica] | None = None,
                     keep: bool = False) -> list[str]:
        """The replicas in order of preference (one per rank). The router counts its first choice
        at once; unless `keep`, the request then completes (its count goes)."""
        pending = None if route is None else FakePending([route, b"body"])
        ranks = await self.router.choose_replicas(self.replicas if candidates is None else candidates, pending)
        assert all(len(rank) == 1 for rank in ranks), ranks
        if pending is not None and not keep:  # routed to the first choice, and done
            self.router.on_request_routed(pending, ranks[0][0].replica_id, None)
            self.router.on_request_completed(ranks[0][0].replica_id, pending.metadata.internal_request_id)
        return [rank[0].replica_id.unique_id for rank in ranks]

    def routed(self, route: Route, to: FakeReplica) -> FakePending:
        pending = FakePending([route])
        self.router.on_request_routed(pending, to.replica_id, None)
        return pending

    def busy(self, to: FakeReplica, n: int) -> list[FakePending]:
        """`n` requests in flight on `to`."""
        return [self.routed(Route("any"), to) for _ in range(n)]

    def done(self, pending: FakePending, to: FakeReplica) -> None:
        self.router.on_request_completed(to.replica_id, pending.metadata.internal_request_id)


def chat(*contents: str) -> str:
    roles = ["system", "user", "assistant"]
    return prompt_text({"messages": [{"role": roles[min(i, 1) if i < 2 else 1 + i % 2], "content": c}
                                     for i, c in enumerate(contents)]})


SYSTEM = "You are a careful assistant who answers questions about the weather in great detail. " * 3


def test_route_of_reads_the_first_argument() -> None:
    assert route_of(None) == Route()
    assert route_of(FakePending([b"not a route"])) == Route()
    assert route_of(FakePending([Route("prefix", prefix="x")])).kind == "prefix"


async def test_empty_candidates_and_pins() -> None:
    r = Router()
    assert await r.router.choose_replicas([], FakePending([Route()])) == []
    assert await r.choose(Route("prefix", prefix=SYSTEM, pin=r.b.replica_id.to_full_id_str())) == ["bbb"]
    # a pin that is not among the candidates (a dead replica) is ignored
    assert (await r.choose(Route("session", session_id="s", pin="gone#gone#gone")))[0] in {"aaa", "bbb", "ccc"}


async def test_rank_picks_by_sorted_id_modulo_count() -> None:
    r = Router()
    assert [(await r.choose(Route("rank", rank=k)))[0] for k in range(4)] == ["aaa", "bbb", "ccc", "aaa"]
    assert await r.choose(Route("rank", rank=1), [r.c, r.a]) == ["ccc"]


async def test_sessions_go_home_and_new_ones_to_the_least_loaded_then_fewest_sessions() -> None:
    r = Router()
    r.routed(Route("place", session_id="s1"), r.a)
    r.routed(Route("place", session_id="s2"), r.a)
    r.routed(Route("session", session_id="s3"), r.b)
    assert await r.choose(Route("session", session_id="s1")) == ["aaa"]
    assert await r.choose(Route("session", session_id="s3")) == ["bbb"]
    r.router.inflight.clear()
    assert await r.choose(Route("place", session_id="new")) == ["ccc", "bbb", "aaa"]
    # an unknown session (or one whose replica is gone) is placed like a new one; "new" counts on ccc
    # from its choice on, so bbb and ccc hold one session each
    assert await r.choose(Route("session", session_id="s1"), [r.b, r.c]) == ["bbb", "ccc"]
    r.busy(r.c, 1)  # the busy one loses; of the idle ones aaa holds fewer sessions (s1 moved to bbb above)
    assert await r.choose(Route("place", session_id="newer")) == ["aaa", "bbb", "ccc"]


async def test_in_flight_counts_rise_on_routing_and_fall_on_completion_only_for_load() -> None:
    r = Router()
    pending = r.busy(r.a, 2)
    r.routed(Route("session", session_id="s", load=False), r.a)  # an event stream: not load
    assert r.router.inflight[r.a.replica_id.to_full_id_str()] == 2
    assert await r.choose(Route("any")) == ["bbb", "ccc", "aaa"]
    for p in pending:
        r.done(p, r.a)
    r.router.on_request_completed(r.a.replica_id, "never-routed")
    assert r.router.inflight[r.a.replica_id.to_full_id_str()] == 0


async def test_a_late_completion_of_a_rejected_attempt_leaves_the_retry_counted() -> None:
    r = Router()
    pending = FakePending([Route("any")])
    first = (await r.router.choose_replicas([r.a, r.b], pending))[0][0]
    retry = (await r.router.choose_replicas([r.a, r.b], pending))[0][0]  # the first choice refused it
    r.router.on_request_completed(first.replica_id, pending.metadata.internal_request_id)  # the late callback
    assert r.router.inflight[retry.replica_id.to_full_id_str()] == 1
    r.router.on_request_routed(pending, retry.replica_id, None)
    r.router.on_request_completed(retry.replica_id, pending.metadata.internal_request_id)
    assert sum(r.router.inflight.values()) == 0


async def test_a_prompt_goes_to_the_replica_that_saw_its_prefix() -> None:
    r = Router()
    first = chat(SYSTEM, "What is the weather in Paris today?")
    r.done(r.routed(Route("prefix", prefix=first), r.b), r.b)
    later = chat(SYSTEM, "What is the weather in Paris today?", "Sunny.", "And tomorrow?")
    assert (await r.choose(Route("prefix", prefix=later)))[0] == "bbb"
    r.busy(r.b, 2)  # at the threshold: still the holder
    assert (await r.choose(Route("prefix", prefix=later)))[0] == "bbb"
    r.busy(r.b, 1)  # past it: the least loaded
    assert (await r.choose(Route("prefix", prefix=later)))[0] in {"aaa", "ccc"}


async def test_of_several_holders_the_least_loaded_wins() -> None:
    r = Router()
    for to in (r.a, r.b):
        r.routed(Route("prefix", prefix=chat(SYSTEM, f"Question for {to.replica_id.unique_id}")), to)
    r.busy(r.a, 1)
    order = await r.choose(Route("prefix", prefix=chat(SYSTEM, "A new conversation entirely")))
    assert order[0] == "bbb" and order[1] == "aaa", order  # holders before the replica that holds nothing


async def test_unrelated_prompts_are_dealt_out_in_turn() -> None:
    r = Router()
    got = []
    for i in range(6):
        prefix = chat(f"Conversation {i} about topic number {i}, which has nothing in common with the others. " * 2)
        to = (await r.choose(Route("prefix", prefix=prefix)))[0]
        got.append(to)
        r.routed(Route("prefix", prefix=prefix), {"aaa": r.a, "bbb": r.b, "ccc": r.c}[to])
        r.router.inflight.clear()  # each finished before the next
    assert got == ["aaa", "bbb", "ccc", "aaa", "bbb", "ccc"]
    # continuing a conversation is not a new prefix: the deal goes on where it was
    r.routed(Route("prefix", prefix=chat("Conversation 0 about topic number 0, which has nothing in common with "
                                         "the others. " * 2, "more")), r.a)
    assert r.router.fresh[r.a.replica_id.to_full_id_str()] == 2


async def test_a_match_too_short_for_the_prompt_counts_as_none() -> None:
    r = Router()
    r.routed(Route("prefix", prefix="x" * 64), r.a)
    long_prompt = "x" * 64 + "y" * 64 * 20  # one chunk of 21 matched: under the 10% threshold
    assert (await r.choose(Route("prefix", prefix=long_prompt)))[0] in {"bbb", "ccc"}


async def test_a_burst_chosen_before_any_is_routed_sees_itself() -> None:
    """Ray chooses for every request of a burst before it routes any: each choice counts at once,
    so six new conversations behind one system prompt split over the replicas (threshold 2)."""
    r = Router()
    prompts = [chat(SYSTEM * 4, f"Conversation {i}: plan a trip.") for i in range(6)]
    got = [(await r.choose(Route("prefix", prefix=p), [r.a, r.b], keep=True))[0] for p in prompts]
    assert sorted(got.count(x) for x in ("aaa", "bbb")) == [3, 3], got
    assert r.router.inflight[r.a.replica_id.to_full_id_str()] == got.count("aaa")


async def test_routing_elsewhere_than_chosen_moves_the_count() -> None:
    r = Router()
    pending = FakePending([Route("prefix", prefix=chat(SYSTEM, "Where to?"))])
    ranks = await r.router.choose_replicas([r.a, r.b], pending)
    chosen, other = (r.a, r.b) if ranks[0][0] is r.a else (r.b, r.a)
    r.router.on_request_routed(pending, other.replica_id, None)  # the first choice was full
    assert r.router.inflight[chosen.replica_id.to_full_id_str()] == 0
    assert r.router.inflight[other.replica_id.to_full_id_str()] == 1
    r.router.on_request_completed(other.replica_id, pending.metadata.internal_request_id)
    assert r.router.inflight[other.replica_id.to_full_id_str()] == 0


async def test_the_power_of_two_comparison_router_honours_pins() -> None:
    """The pin is all it reads of a Route (the rest is Ray's own power-of-two choice)."""
    from layerserve.cluster.router import PinnedPowerOfTwoRouter

    r = Router()
    pow2 = PinnedPowerOfTwoRouter.__new__(PinnedPowerOfTwoRouter)
    ranks = await pow2.choose_replicas(r.replicas, FakePending([Route("session", session_id="s",
                                                                      pin=r.c.replica_id.to_full_id_str())]))
    assert ranks == [[r.c]]
