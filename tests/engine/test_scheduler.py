"""Scheduling through the real EngineCore (add_request / step / abort / stats) with a fake runner:
chunked prefill, preemption, n>1 forks, prefix-cache reuse, no deadlock, no leaked blocks.

The fake runner stands in for the model. It keeps a simulated KV pool -- each slot holds the exact
token prefix whose key/value it would store -- and, before every forward, checks that each
scheduled sequence's already-computed positions hold its own prefix: a prefix-cache hit, a fork or
a recompute after preemption that served the wrong KV fails at once. Its "sampled" token is a
pure function of the sequence's tokens and choice index, so every output can be checked against
the same model run alone, whatever the scheduling did.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import fakes
import pytest

from layerserve.engine.core import EngineCore
from layerserve.engine.request import FinishReason, SamplingParams
from layerserve.model.runner import ModelOutput


def model_token(token_ids: list[int], index: int) -> int:
    """The fake model's next token: depends on every token so far and on the choice index (as a
    seeded sample would), never an EOS id (0 and 2 in the default vocabulary)."""
    h = 2166136261 ^ (index * 7919)
    for t in token_ids:
        h = ((h ^ t) * 16777619) & 0xFFFFFFFF
    return 100 + h % 20000


def expected_output(prompt: list[int], index: int, max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(model_token(ids, index))
    return ids[len(prompt):]


@dataclass
class Step:
    """What the runner was asked to do in one step, recorded when it ran."""

    scheduled: list[tuple[str, int, int, int]]  # (request id, choice index, first position, tokens computed)
    samples: list[tuple[str, int, int]]  # (request id, choice index, row of `scheduled` sampled from)
    copies: list[tuple[int, int]]
    block_tables: dict[tuple[str, int], list[int]]

    @property
    def num_tokens(self) -> int:
        return sum(n for *_, n in self.scheduled)

    def sizes(self) -> dict[tuple[str, int], int]:
        return {(rid, index): n for rid, index, _, n in self.scheduled}


class FakeRunner:
    """The runner contract (SchedulerOutput in, one token per sample out), with a simulated KV pool."""

    def __init__(self, vocab_size: int, block_size: int) -> None:
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the token prefix whose KV it holds
        self.steps: list[Step] = []

    def _slot(self, block_table: list[int], pos: int) -> int:
        assert pos // self.block_size < len(block_table), f"position {pos} has no block"
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, out) -> ModelOutput:
        step = Step([], [], list(out.copies), {})
        for item in out.scheduled:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            ids, key = seq.token_ids, (seq.group.request_id, seq.index)
            assert n > 0 and start + n <= len(ids)
            for pos in range(start):  # attention reads these: they must be this sequence's own prefix
                assert self.kv.get(self._slot(seq.block_table, pos)) == tuple(ids[:pos + 1]), \
                    f"{key}: the KV at position {pos} is not this sequence's"
            for pos in range(start, start + n):
                self.kv[self._slot(seq.block_table, pos)] = tuple(ids[:pos + 1])
            step.scheduled.append((*key, start, n))
            step.block_tables[key] = list(seq.block_table)
        bs = self.block_size
        for src, dst in out.copies:  # after the forward, as the real runner does
            for off in range(bs):
                if src * bs + off in self.kv:
                    self.kv[dst * bs + off] = self.kv[src * bs + off]
                else:
                    self.kv.pop(dst * bs + off, None)
        tokens = []
        for seq, row in out.samples:
            parent = out.scheduled[row].seq
            assert parent.num_computed_tokens + out.scheduled[row].num_new_tokens == len(parent.token_ids)
            assert parent.token_ids == seq.token_ids  # a fork samples from its parent's last row
            step.samples.append((seq.group.request_id, seq.index, row))
            tokens.append(model_token(seq.token_ids, seq.index))
        self.steps.append(step)
        return ModelOutput([[t] for t in tokens], [[None] for _ in tokens])


def make_core(tokenizer, *, num_blocks: int, block_size: int = 4, **limits) -> EngineCore:
    """The real EngineCore over this file's checking runner."""
    return fakes.make_core(tokenizer, num_blocks=num_blocks, block_size=block_size,
                           runner=FakeRunner(tokenizer.vocab_size, block_size), **limits)


def params(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, n=n, temperature=0, ignore_eos=True)


class Results:
    """Every RequestOutput of a run, folded per request: tokens per choice, finish reasons, usage."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[int, list[int]]] = {}
        self.finish: dict[str, dict[int, FinishReason]] = {}
        self.finished: dict[str, object] = {}  # request id -> its last output

    def add(self, outputs) -> None:
        for out in outputs:
            assert out.request_id not in self.finished, f"{out.request_id}: output after the last one"
            assert out.error is None, out.error
            for d in out.deltas:
                self.tokens.setdefault(out.request_id, {}).setdefault(d.index, []).extend(d.token_ids)
                if d.finish_reason is not None:
                    self.finish.setdefault(out.request_id, {})[d.index] = d.finish_reason
            if out.finished:
                self.finished[out.request_id] = out


def run_until_idle(core: EngineCore, results: Results | None = None, max_steps: int = 100_000) -> Results:
    results = results or Results()
    for _ in range(max_steps):
        if not core.has_work():
            return results
        results.add(core.step())
    raise AssertionError(f"no progress: the engine still has work after {max_steps} steps ({core.stats()})")


def recomputed(steps: list[Step]) -> set[tuple[str, int]]:
    """Sequences whose computation went back to an earlier position (preempted, then recomputed)."""
    done: dict[tuple[str, int], int] = {}
    back = set()
    for step in steps:
        for rid, index, start, n in step.scheduled:
            if start < done.get((rid, index), 0):
                back.add((rid, index))
            done[(rid, index)] = start + n
    return back


def assert_idle_and_empty(core: EngineCore) -> None:
    stats = core.stats()
    assert not core.has_work() and stats.num_running == stats.num_waiting == 0
    assert not core.scheduler.running and not core.scheduler.waiting
    assert core.kv.num_free_blocks == stats.num_free_blocks == stats.num_blocks  # every block came back


def assert_outputs_match_the_model(results: Results, requests: dict[str, tuple[list[int], int, int]]) -> None:
    """Each choice produced what the fake model produces alone: scheduling changed nothing."""
    assert set(results.finished) == set(requests)
    for rid, (prompt, max_tokens, n) in requests.items():
        assert sorted(results.tokens[rid]) == list(range(n)), rid
        for index in range(n):
            assert results.tokens[rid][index] == expected_output(prompt, index, max_tokens), (rid, index)
            assert results.finish[rid][index] is FinishReason.LENGTH
        assert results.finished[rid].completion_tokens == n * max_tokens


# ---- chunked prefill ----------------------------------------------------------------------------
def test_chunked_prefill_interleaves_with_decode(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=64, max_num_batched_tokens=8)
    runner = core.runner
    a, b = [1001, 1002, 1003], list(range(2000, 2030))
    core.add_request("a", a, params(20))
    results = Results()
    results.add(core.step())  # a's prompt
    assert runner.steps[-1].sizes() == {("a", 0): 3}
    core.add_request("b", b, params(2))
    results.add(core.step())
    step = runner.steps[-1]
    assert step.sizes() == {("a", 0): 1, ("b", 0): 7}  # a keeps decoding while b's prompt is chunked
    assert [(rid, index) for rid, index, _ in step.samples] == [("a", 0)]  # b's chunk is not at its end yet
    run_until_idle(core, results)
    b_chunks = [(start, n) for s in runner.steps for rid, _, start, n in s.scheduled if rid == "b"]
    assert b_chunks[:4] == [(0, 7), (7, 7), (14, 7), (21, 7)]  # 7 per step: one token of the budget is a's
    assert all(s.num_tokens <= 8 for s in runner.steps)
    a_steps = [s for s in runner.steps[1:] if ("a", 0) in s.sizes()]
    assert all(s.sizes()[("a", 0)] == 1 for s in a_steps) and len(a_steps) == 19  # a decoded every step
    assert_outputs_match_the_model(results, {"a": (a, 20, 1), "b": (b, 2, 1)})
    assert_idle_and_empty(core)


def test_a_prompt_longer_than_the_step_budget_is_computed_in_chunks(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=64, max_num_batched_tokens=16)
    prompt = list(range(3000, 3050))
    core.add_request("long", prompt, params(3))
    results = run_until_idle(core)
    chunks = [(start, n) for s in core.runner.steps for _, _, start, n in s.scheduled]
    assert chunks == [(0, 16), (16, 16), (32, 16), (48, 2), (50, 1), (51, 1)]
    assert [len(s.samples) for s in core.runner.steps] == [0, 0, 0, 1, 1, 1]  # sampled only at the prompt's end
    assert_outputs_match_the_model(results, {"long": (prompt, 3, 1)})
    assert_idle_and_empty(core)


# ---- preemption and progress --------------------------------------------------------------------
def test_preemption_under_tiny_pool_finishes_everything_without_leaks(smollm_tokenizer):
    """12 blocks of 4 tokens; each request needs 6 (10 prompt + 12 output tokens): at most two fit,
    so sequences are preempted, recomputed -- and still produce exactly what they produce alone."""
    core = make_core(smollm_tokenizer, num_blocks=12, max_num_batched_tokens=64, max_num_seqs=8)
    requests = {str(i): (list(range(100 + 20 * i, 110 + 20 * i)), 12, 1) for i in range(6)}
    for rid, (prompt, max_tokens, n) in requests.items():
        core.add_request(rid, prompt, params(max_tokens, n))
    results = run_until_idle(core, max_steps=2_000)
    assert core.stats().num_preemptions > 0
    assert recomputed(core.runner.steps), "no preempted sequence was recomputed"
    assert_outputs_match_the_model(results, requests)
    assert_idle_and_empty(core)


def test_requests_that_each_need_the_whole_pool_do_not_deadlock(smollm_tokenizer):
    """Each request needs every block (8 blocks = 32 tokens: 22 prompt + 10 output) and prompts are
    chunked: the oldest request always progresses, so all finish, one after another."""
    core = make_core(smollm_tokenizer, num_blocks=8, max_num_batched_tokens=8, max_num_seqs=4)
    requests = {f"r{i}": (list(range(4000 + 100 * i, 4022 + 100 * i)), 10, 1) for i in range(5)}
    for rid, (prompt, max_tokens, n) in requests.items():
        core.add_request(rid, prompt, params(max_tokens, n))
    results = run_until_idle(core, max_steps=5_000)
    assert_outputs_match_the_model(results, requests)
    order = [rid for rid, out in results.finished.items()]
    assert order == sorted(requests)  # oldest first
    assert_idle_and_empty(core)


# ---- n > 1 -------------------------------------------------------------------------------------
def test_fork_shares_full_blocks_and_copies_partial(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=32)
    prompt = list(range(500, 510))  # 10 tokens: 2 full blocks and a partial one
    core.add_request("n", prompt, params(3, n=3))
    results = Results()
    results.add(core.step())
    step = core.runner.steps[-1]
    assert step.sizes() == {("n", 0): 10}  # the prompt is computed once, for choice 0
    assert [(index, row) for _, index, row in step.samples] == [(0, 0), (1, 0), (2, 0)]  # all sample its row
    parent, c1, c2 = (step.block_tables.get(("n", i)) for i in range(3))
    assert c1 is None and c2 is None  # the children were not computed, only forked
    # the children's KV: the two full blocks are shared, the partial third block is copied for each
    assert len(step.copies) == 2 and all(src == parent[2] for src, _ in step.copies)
    assert len({dst for _, dst in step.copies} | set(parent)) == 5
    assert core.kv.num_free_blocks == 32 - 5  # 3 for the parent, 1 copy per child; nothing else held
    assert len(core.scheduler.running) == 3
    results.add(core.step())
    step = core.runner.steps[-1]
    assert sorted(step.scheduled) == [("n", i, 10, 1) for i in range(3)]  # each child decodes from position 10
    for i in (1, 2):
        assert step.block_tables[("n", i)][:2] == step.block_tables[("n", 0)][:2]
        assert step.block_tables[("n", i)][2] != step.block_tables[("n", 0)][2]
    run_until_idle(core, results)
    assert_outputs_match_the_model(results, {"n": (prompt, 3, 3)})
    assert len({tuple(t) for t in results.tokens["n"].values()}) == 3
    assert_idle_and_empty(core)


def test_a_child_without_a_free_slot_waits_and_recomputes_from_the_cache(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=32, max_num_seqs=2)
    prompt = list(range(600, 613))  # 13 tokens: 3 full blocks
    core.add_request("n", prompt, params(4, n=3))
    results = Results()
    results.add(core.step())
    assert [index for _, index, _ in core.runner.steps[-1].samples] == [0, 1]  # one child forked
    assert [(s.group.request_id, s.index) for s in core.scheduler.waiting] == [("n", 2)]
    results = run_until_idle(core, results)
    late = [(start, n) for s in core.runner.steps for rid, index, start, n in s.scheduled if index == 2]
    assert late[0] == (12, 1)  # its prompt's 3 full blocks came from the prefix cache
    assert_outputs_match_the_model(results, {"n": (prompt, 4, 3)})
    assert_idle_and_empty(core)


# ---- prefix cache -------------------------------------------------------------------------------
def test_prefix_cache_reuse(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=64)
    prompt = list(range(700, 720))  # 20 tokens: 5 full blocks, the last one left to compute
    core.add_request("first", prompt, params(2))
    results = run_until_idle(core)
    assert results.finished["first"].cached_tokens == 0
    before = core.stats()
    core.add_request("again", prompt, params(2))
    core.add_request("shares-8", prompt[:8] + list(range(900, 912)), params(2))
    results = run_until_idle(core, results)
    first_chunks = {}
    for s in core.runner.steps:
        for rid, _, start, n in s.scheduled:
            first_chunks.setdefault(rid, (start, n))
    assert first_chunks["again"] == (16, 4)  # 4 blocks from the cache, at least one token computed
    assert first_chunks["shares-8"] == (8, 12)
    assert results.finished["again"].cached_tokens == 16
    assert results.finished["shares-8"].cached_tokens == 8
    after = core.stats()
    assert after.prefix_queries - before.prefix_queries == 40
    assert after.prefix_hits - before.prefix_hits == 24
    assert_outputs_match_the_model(results, {"first": (prompt, 2, 1), "again": (prompt, 2, 1),
                                             "shares-8": (prompt[:8] + list(range(900, 912)), 2, 1)})
    assert_idle_and_empty(core)
    assert core.stats().num_cached_blocks > 0  # freed blocks stay cached


def test_a_cached_block_is_reused_only_after_the_same_prefix(smollm_tokenizer):
    """X = [A, C], Y = [B, C]: the same tokens C in block 1, computed after different blocks.
    Z = [B, C, ...] must reuse Y's C, never X's (whose KV was computed after A)."""
    core = make_core(smollm_tokenizer, num_blocks=64)
    a, b, c = [11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]
    requests = {"x": (a + c + [41], 1, 1), "y": (b + c + [42], 1, 1), "z": (b + c + [43, 44], 1, 1)}
    results = Results()
    for rid, (prompt, max_tokens, n) in requests.items():
        core.add_request(rid, prompt, params(max_tokens, n))
        run_until_idle(core, results)  # one after another: x and y are cached before z arrives
    assert results.finished["y"].cached_tokens == 0  # block 0 differs: nothing of x fits
    assert results.finished["z"].cached_tokens == 8  # both of y's blocks (the runner checked their KV)
    assert_outputs_match_the_model(results, requests)
    assert_idle_and_empty(core)


def test_random_requests_leak_no_blocks(smollm_tokenizer):
    rng = random.Random(0)
    core = make_core(smollm_tokenizer, num_blocks=40, max_num_batched_tokens=32, max_num_seqs=16)
    prefix = list(range(1000, 1012))
    requests = {}
    for i in range(600):
        prompt = (prefix if rng.random() < 0.5 else []) + [rng.randrange(100, 150) for _ in range(rng.randint(1, 20))]
        requests[str(i)] = (prompt, rng.randint(1, 8), rng.choice([1, 1, 1, 2]))
        core.add_request(str(i), prompt, params(requests[str(i)][1], requests[str(i)][2]))
    results = run_until_idle(core, max_steps=20_000)
    stats = core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_hits > 0  # the walk reached both paths
    assert sum(out.cached_tokens > 0 for out in results.finished.values()) > 100
    assert_outputs_match_the_model(results, requests)
    assert_idle_and_empty(core)


# ---- abort --------------------------------------------------------------------------------------
def test_abort_while_waiting_frees_prefix_refs(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=8)
    prompt = list(range(800, 809))
    core.add_request("warm", prompt, params(1))
    run_until_idle(core)  # its two full blocks are now cached
    core.add_request("x", prompt, params(1))
    out = core.abort("x")  # aborted before it ever ran
    assert out.finished and [d.finish_reason for d in out.deltas] == [FinishReason.ABORT]
    assert core.abort("x") is None  # gone
    assert_idle_and_empty(core)


def test_abort_while_running_and_while_preempted(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=6, max_num_batched_tokens=64)
    core.add_request("old", list(range(100, 110)), params(12))  # 22 tokens: 6 blocks, the whole pool
    core.add_request("young", list(range(200, 210)), params(12))
    results = Results()
    while not any(s.group.request_id == "young" for s in core.scheduler.waiting) or core.stats().num_preemptions == 0:
        results.add(core.step())
        assert core.has_work()
    out = core.abort("young")  # preempted, back in the queue
    assert out.finished and [d.finish_reason for d in out.deltas] == [FinishReason.ABORT]
    results.add(core.step())
    out = core.abort("old")  # running
    assert out.finished and [d.finish_reason for d in out.deltas] == [FinishReason.ABORT]
    assert_idle_and_empty(core)
    core.add_request("after", list(range(300, 310)), params(4))  # the engine goes on
    results = run_until_idle(core)
    assert_outputs_match_the_model(results, {"after": (list(range(300, 310)), 4, 1)})
    assert_idle_and_empty(core)


@pytest.mark.parametrize("n", [1, 3])
def test_abort_at_every_point_of_a_request_leaks_nothing(smollm_tokenizer, n):
    """Abort after each step of a request's life (waiting, mid-prefill, just forked, decoding)."""
    bystander = list(range(200, 205))
    for abort_after in range(12):
        core = make_core(smollm_tokenizer, num_blocks=16, max_num_batched_tokens=6)
        core.add_request("victim", list(range(100, 115)), params(8, n=n))
        core.add_request("bystander", bystander, params(8))
        results = Results()
        for _ in range(abort_after):
            results.add(core.step())
        if "victim" not in results.finished:
            out = core.abort("victim")
            assert out.finished and FinishReason.ABORT in {d.finish_reason for d in out.deltas}
        results = run_until_idle(core, results)
        assert results.tokens["bystander"][0] == expected_output(bystander, 0, 8)
        assert_idle_and_empty(core)
