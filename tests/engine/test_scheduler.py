"""Scheduler + KV pool driven by a fake runner: chunked prefill, preemption, forks, no leaks."""

from __future__ import annotations

import random

from layerserve.config import SchedulerConfig
from layerserve.engine.kv_cache import KVCacheManager
from layerserve.engine.request import SamplingParams
from layerserve.engine.scheduler import Scheduler
from layerserve.engine.sequence import RequestGroup, Sequence


def make_group(rid: str, prompt: list[int], max_tokens: int, n: int = 1) -> RequestGroup:
    group = RequestGroup(rid, prompt, SamplingParams(max_tokens=max_tokens, n=n), 0.0)
    group.seqs = [Sequence(i, group, i, list(prompt), len(prompt), seed=i) for i in range(n)]
    return group


def step(sched: Scheduler, kv: KVCacheManager, rng: random.Random | None = None):
    """One engine step with a fake model: every sampled token is 7 (or random)."""
    out = sched.schedule()
    for item in out.scheduled:
        seq = item.seq
        seq.num_computed_tokens += item.num_new_tokens
        seq.num_indexed_blocks = kv.cache_full_blocks(seq.block_table, seq.token_ids, seq.num_computed_tokens,
                                                      seq.block_hashes, seq.num_indexed_blocks)
    for seq, _ in out.samples:
        seq.token_ids.append(rng.randrange(50) if rng else 7)
        if seq.num_output_tokens >= seq.params.max_tokens:
            sched.finish(seq)
    return out


def run_all(sched, kv, groups, rng=None, max_steps=100_000):
    for g in groups:
        sched.add(g)
    steps = 0
    while sched.has_work:
        step(sched, kv, rng)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def test_chunked_prefill_interleaves_with_decode():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), kv)
    short = make_group("a", [1, 2, 3], max_tokens=20)
    sched.add(short)
    step(sched, kv)  # a's prompt
    long = make_group("b", list(range(30)), max_tokens=2)
    sched.add(long)
    out = step(sched, kv)
    sizes = {s.seq.group.request_id: s.num_new_tokens for s in out.scheduled}
    assert sizes == {"a": 1, "b": 7}  # a keeps decoding while b's prompt is chunked
    assert out.num_batched_tokens <= 8
    assert [s.group.request_id for s, _ in out.samples] == ["a"]  # b's chunk is not at its end yet


def test_preemption_under_tiny_pool_finishes_everything_without_leaks():
    kv = KVCacheManager(num_blocks=12, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), kv)
    groups = [make_group(str(i), list(range(i, i + 10)), max_tokens=12) for i in range(6)]
    run_all(sched, kv, groups)
    assert sched.num_preemptions > 0
    assert all(len(s.output_ids) == 12 for g in groups for s in g.seqs)
    assert kv.num_free_blocks == kv.num_blocks


def test_fork_shares_full_blocks_and_copies_partial():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    sched = Scheduler(SchedulerConfig(), kv)
    g = make_group("n", list(range(10)), max_tokens=3, n=3)
    sched.add(g)
    out = sched.schedule()
    assert [s.index for s, _ in out.samples] == [0, 1, 2]
    parent, c1, c2 = g.seqs
    assert c1.block_table[:2] == parent.block_table[:2] == c2.block_table[:2]
    assert kv.ref_count(parent.block_table[0]) == 3
    assert len(out.copies) == 2 and all(src == parent.block_table[2] for src, _ in out.copies)
    assert c1.num_computed_tokens == 10


def test_random_requests_leak_no_blocks():
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=40, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=16), kv)
    prefix = list(range(1000, 1012))
    groups = []
    for i in range(1000):
        prompt = (prefix if rng.random() < 0.5 else []) + [rng.randrange(50) for _ in range(rng.randint(1, 20))]
        groups.append(make_group(str(i), prompt, max_tokens=rng.randint(1, 8), n=rng.choice([1, 1, 1, 2])))
    run_all(sched, kv, groups, rng)
    assert all(s.finished for g in groups for s in g.seqs)
    assert kv.num_free_blocks == kv.num_blocks
    assert all(kv.ref_count(b) == 0 for b in range(kv.num_blocks))
    assert kv.stats.hits > 0


def test_finish_while_waiting_frees_prefix_refs():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(), kv)
    g = make_group("x", list(range(9)), max_tokens=1)
    sched.add(g)
    sched.finish(g.seqs[0])  # aborted before it ever ran
    assert not sched.has_work and kv.num_free_blocks == 8
