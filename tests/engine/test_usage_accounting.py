"""Usage is billing: cached_tokens and the prefix-cache counters report what was really reused."""

from __future__ import annotations

from layerserve.engine.request import SamplingParams

from fakes import make_core, run_until_idle


def test_cached_tokens_are_what_the_admission_reused_not_an_earlier_match(smollm_tokenizer):
    """B matches A's 3 cached blocks while the pool is full, waits, and loses one of them to
    eviction before it is admitted: it must report the 8 tokens it reused, not the 12 it saw."""
    core = make_core(smollm_tokenizer, num_blocks=8, block_size=4)
    a = list(range(10, 22))  # 12 tokens: 3 full blocks once computed
    core.add_request("a", a, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    run_until_idle(core)
    assert core.kv.num_cached_blocks == 3
    # the hog takes the 5 uncached blocks, then grows into the cached ones (LRU: A's last block first)
    core.add_request("hog", list(range(500, 520)), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    core.step()
    core.add_request("b", a + list(range(900, 908)), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    for _ in range(3):  # b matches 3 blocks, cannot get 2 more, waits
        core.step()
    assert [s.group.request_id for s in core.scheduler.waiting] == ["b"]
    while core.kv.num_cached_blocks == 3:  # the hog's growth evicts A's last block
        core.step()
    core.abort("hog")
    outputs = run_until_idle(core)
    b = [o for o in outputs if o.request_id == "b" and o.finished][0]
    assert b.cached_tokens == 8
    # one query per request, whatever the retries: a (12 tokens), hog (20), b (20); hits: b's 8
    assert (core.kv.stats.queries, core.kv.stats.hits) == (52, 8)


def test_a_preempted_request_is_not_queried_twice(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=6, block_size=4)
    for name, base in (("x", 100), ("y", 200)):
        core.add_request(name, list(range(base, base + 8)), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    run_until_idle(core)
    assert core.scheduler.num_preemptions > 0  # 6 blocks cannot hold both 20-token sequences
    assert core.kv.stats.queries == 16
