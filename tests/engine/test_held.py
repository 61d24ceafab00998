"""Sessions' held KV in the engine (engine/held.py and the sessions part of core/scheduler), no model.

The runner here is fakes.FakeRunner (it emits FILLER) that also checks every step reads only KV
its own sequence wrote: a slot holds the token prefix whose KV it is, so a block reused while
someone else still reads it, a prefix-cache hit on a rewritten block, or an evicted held block
shows up as an assertion in the runner, not as a wrong token later.
"""

from __future__ import annotations

import pytest

from layerserve.config import CacheConfig, EngineConfig, SchedulerConfig
from layerserve.engine.core import EngineCore, InvalidRequest
from layerserve.engine.request import FinishReason, SamplingParams

from fakes import FILLER, FakeRunner, run_until_idle

BS = 4


class CheckingRunner(FakeRunner):
    """FakeRunner that records (request id, start, count, background) per step and verifies KV reads."""

    def __init__(self, vocab_size: int, block_size: int, hook=None) -> None:
        super().__init__(vocab_size, hook)
        self.block_size = block_size
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the token prefix whose KV it holds
        self.log: list[list[tuple[str, int, int, bool]]] = []

    def _slot(self, block_table: list[int], pos: int) -> int:
        assert pos // self.block_size < len(block_table), f"position {pos} has no block"
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, out):
        assert not out.copies  # no n>1 here
        rows = []
        for item in out.scheduled:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            ids = seq.token_ids
            assert n > 0 and start + n <= len(ids)
            for pos in range(start):
                assert self.kv.get(self._slot(seq.block_table, pos)) == tuple(ids[:pos + 1]), \
                    f"{seq.group.request_id}: the KV at position {pos} is not this sequence's"
            for pos in range(start, start + n):
                self.kv[self._slot(seq.block_table, pos)] = tuple(ids[:pos + 1])
            rows.append((seq.group.request_id, start, n, seq.group.background))
        self.log.append(rows)
        return super().execute(out)

    def computed(self, request_id: str) -> list[tuple[int, int]]:
        """(start, count) of every chunk the runner computed for a request."""
        return [(s, n) for step in self.log for rid, s, n, _ in step if rid == request_id]


def new_core(tokenizer, *, num_blocks: int, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
             max_model_len: int = 64, background_share: float = 0.25, hook=None) -> EngineCore:
    config = EngineConfig(model="fake", speculative=None,
                          cache=CacheConfig(block_size=BS, num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                                    max_num_batched_tokens=max_num_batched_tokens,
                                                    max_model_len=max_model_len,
                                                    background_share=background_share))
    return EngineCore(config, CheckingRunner(tokenizer.vocab_size, BS, hook), tokenizer, num_blocks)


def params(max_tokens: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def final(outputs, request_id: str):
    done = [o for o in outputs if o.request_id == request_id and o.finished]
    assert len(done) == 1, f"{request_id}: {len(done)} final outputs"
    return done[0]


def tokens_of(outputs, request_id: str) -> list[int]:
    return [t for o in outputs if o.request_id == request_id for d in o.deltas for t in d.token_ids]


def finish_of(out) -> FinishReason:
    (delta,) = [d for d in out.deltas if d.finish_reason is not None]
    return delta.finish_reason


def run(core, request_id, prompt, max_tokens, session_id=None, **kw):
    core.add_request(request_id, prompt, params(max_tokens), session_id=session_id, **kw)
    outputs = run_until_idle(core)
    return final(outputs, request_id), outputs


# ---- 1. reuse of the held prefix -------------------------------------------------------------

def test_a_follow_up_request_computes_only_the_tail(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=64)
    core.open_session("s")
    p1 = list(range(10, 20))  # 10 tokens
    out1, outputs = run(core, "r1", p1, 3, "s")
    assert out1.held_tokens == 0 and out1.cached_tokens == 0
    assert tokens_of(outputs, "r1") == [FILLER] * 3
    assert core.runner.computed("r1") == [(0, 10), (10, 1), (11, 1)]
    assert out1.session_token_ids == p1 + [FILLER] * 3
    assert out1.session_kv_tokens == 12  # the last sampled token has no KV yet

    p2 = out1.session_token_ids + [50, 51, 52]  # 16 tokens extending the first turn
    steps_before = len(core.runner.steps)
    out2, _ = run(core, "r2", p2, 2, "s")
    assert out2.held_tokens == 12 and out2.cached_tokens == 12
    first = core.runner.steps[steps_before]
    assert [(i.seq.group.request_id, i.num_new_tokens) for i in first.scheduled] == [("r2", 4)]
    assert core.runner.computed("r2") == [(12, 4), (16, 1)]
    assert out2.session_token_ids == p2 + [FILLER] * 2 and out2.session_kv_tokens == 17

    # a prompt that is all held tokens: the reuse is capped at len(prompt)-1 (a sample needs a row)
    p3 = out2.session_token_ids[:12]
    out3, _ = run(core, "r3", p3, 1, "s")
    assert out3.held_tokens == 11
    assert core.runner.computed("r3") == [(11, 1)]
    assert out3.session_token_ids == p3 + [FILLER] and out3.session_kv_tokens == 12
    core.close_session("s")
    assert core.kv.num_free_blocks == core.kv.num_blocks


# ---- 2. divergence ---------------------------------------------------------------------------

def test_divergence_inside_a_private_block_writes_it_in_place_and_the_cache_forgets_it(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=64)
    core.open_session("s")
    old = list(range(100, 116))  # 4 full blocks
    run(core, "r1", old, 1, "s")
    ctx = core.held["s"]
    assert ctx.num_kv == 16 and len(ctx.block_table) == 4
    block2 = ctx.block_table[2]

    new = old[:10] + list(range(200, 206))  # diverges at 10: inside block 2, which only the session holds
    out, _ = run(core, "r2", new, 1, "s")
    assert out.held_tokens == 10
    assert core.runner.computed("r2") == [(10, 6)]
    assert core.held["s"].block_table[2] == block2  # written in place, no copy

    # the old prompt must not hit the rewritten block (nor anything after it)
    stale, _ = run(core, "old", old + [7], 1)
    assert stale.cached_tokens == 8
    assert core.runner.computed("old")[0] == (8, 9)
    core.close_session("s")
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_divergence_inside_a_shared_block_rounds_the_reuse_down(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=64)
    core.open_session("s")
    old = list(range(100, 116))
    run(core, "r1", old, 1, "s")
    ctx = core.held["s"]
    block2 = ctx.block_table[2]
    # a stateless request shares blocks 0..2 with the session through the prefix cache, and runs on
    core.add_request("other", old[:12] + list(range(300, 308)), params(20))
    outputs = core.step()
    assert core.kv.ref_count(block2) == 2

    new = old[:10] + list(range(200, 206))
    core.add_request("r2", new, params(1), session_id="s")
    outputs += run_until_idle(core)  # the checking runner: "other" still reads its own block 2
    out = final(outputs, "r2")
    assert out.held_tokens == 8
    assert core.runner.computed("r2") == [(8, 8)]
    assert core.held["s"].block_table[2] != block2
    assert final(outputs, "other").cached_tokens == 12
    assert tokens_of(outputs, "other") == [FILLER] * 20

    # block 2's old contents were never written: still a valid prefix-cache hit
    again, _ = run(core, "again", old[:12] + [9], 1)
    assert again.cached_tokens == 12
    core.close_session("s")
    assert core.kv.num_free_blocks == core.kv.num_blocks


# ---- 3. held blocks are never evicted -------------------------------------------------------

def test_held_blocks_survive_a_pool_cycled_by_stateless_requests(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=16, max_model_len=32)
    core.open_session("s")
    out1, _ = run(core, "r1", list(range(10, 21)), 1, "s")  # 11 tokens of KV: 3 blocks
    held = list(core.held["s"].block_table)
    assert len(held) == 3 and out1.session_kv_tokens == 11

    seen: set[int] = set()

    def hook(out):
        for item in out.scheduled:
            if item.seq.held is None:
                assert not set(item.seq.block_table) & set(held), "a held block was handed to another request"
                seen.update(item.seq.block_table)

    core.runner.hook = hook
    for k in range(12):  # 12 x 7 blocks through the 13 blocks the session leaves
        core.add_request(f"x{k}", list(range(1000 + 40 * k + 1, 1000 + 40 * k + 21)), params(8))
    outputs = run_until_idle(core)
    assert all(final(outputs, f"x{k}").error is None for k in range(12))
    assert seen == set(range(16)) - set(held)  # every free block was used (and reused)
    assert core.held["s"].block_table == held and all(core.kv.ref_count(b) == 1 for b in held)

    out2, _ = run(core, "r2", out1.session_token_ids + [77, 78], 1, "s")
    assert out2.held_tokens == 11
    assert core.runner.computed("r2") == [(11, 3)]
    core.close_session("s")
    assert core.kv.num_free_blocks == core.kv.num_blocks


# ---- 4. no leaks -----------------------------------------------------------------------------

def test_closing_every_session_frees_the_whole_pool(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=64, max_num_batched_tokens=8)
    for sid in ("a", "b", "c"):
        core.open_session(sid)
    run(core, "a1", list(range(10, 30)), 4, "a")
    run(core, "b1", list(range(10, 30)), 0, "b")  # same tokens: shares blocks with "a" via the cache
    out, _ = run(core, "a2", list(range(10, 24)) + [5, 6, 7], 2, "a")  # diverges in a block "b" shares
    assert out.held_tokens == 12
    core.add_request("c1", list(range(40, 70)), params(5), session_id="c")
    core.step()
    core.abort("c1")  # mid-prefill
    run(core, "x", list(range(10, 26)), 3)  # stateless, cache hits on held blocks
    assert core.kv.num_free_blocks < core.kv.num_blocks
    for sid in ("a", "b", "c"):
        core.close_session(sid)
    assert not core.has_work() and not core.groups
    assert core.kv.num_free_blocks == core.kv.num_blocks


@pytest.mark.parametrize("how", ["abort", "finish"])
def test_closing_a_session_in_flight_frees_its_blocks_when_the_request_ends(smollm_tokenizer, how):
    core = new_core(smollm_tokenizer, num_blocks=32)
    core.open_session("s")
    run(core, "r1", list(range(10, 20)), 2, "s")
    core.add_request("r2", list(range(10, 20)) + [FILLER, 50, 51], params(6), session_id="s")
    core.step()
    core.step()
    core.close_session("s")
    assert "s" not in core.held
    core.open_session("s")  # a new session under the same id is a fresh context
    fresh = core.held["s"]
    assert core.kv.num_free_blocks < core.kv.num_blocks  # r2 still has its blocks
    if how == "abort":
        out = core.abort("r2")
        assert out.finished
    else:
        out = final(run_until_idle(core), "r2")
        assert out.error is None and out.completion_tokens == 6
    assert not core.groups and not core.has_work()
    assert fresh.block_table == [] and fresh.token_ids == [] and fresh.num_kv == 0
    assert core.kv.num_free_blocks == core.kv.num_blocks
    core.close_session("s")
    assert core.kv.num_free_blocks == core.kv.num_blocks


# ---- 5. prefill-only ---------------------------------------------------------------------------

def test_prefill_only_computes_the_prompt_samples_nothing_and_a_repeat_is_covered(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=32)
    core.open_session("s")
    prompt = list(range(10, 20))
    out, outputs = run(core, "w1", prompt, 0, "s")
    assert tokens_of(outputs, "w1") == [] and out.completion_tokens == 0
    assert finish_of(out) is FinishReason.LENGTH and out.error is None
    assert core.runner.computed("w1") == [(0, 10)]
    assert all(not step.samples for step in core.runner.steps)
    assert out.session_token_ids == prompt and out.session_kv_tokens == 10

    n_steps = len(core.runner.steps)
    core.add_request("w2", prompt, params(0), session_id="s")
    assert core.has_work()
    outputs = core.step()  # finished when added: its output comes on the next step, no forward
    out2 = final(outputs, "w2")
    assert len(core.runner.steps) == n_steps and not core.has_work()
    assert out2.held_tokens == 10 and finish_of(out2) is FinishReason.LENGTH and out2.completion_tokens == 0
    assert out2.session_token_ids == prompt and out2.session_kv_tokens == 10
    assert core.held["s"].in_use is None  # the session is free for the next request

    # a prefix of what it holds is covered too (the rest is dropped, in place)
    out3, _ = run(core, "w3", prompt[:6], 0, "s")
    assert out3.held_tokens == 6 and len(core.runner.steps) == n_steps
    assert out3.session_kv_tokens == 6 and len(core.held["s"].block_table) == 2
    core.close_session("s")
    assert core.kv.num_free_blocks == core.kv.num_blocks


# ---- 6. abort mid-prefill ----------------------------------------------------------------------

def test_abort_mid_prefill_keeps_what_was_computed(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=32, max_num_batched_tokens=8)
    core.open_session("s")
    prompt = list(range(10, 40))  # 30 tokens: 4 chunks of 8
    core.add_request("r1", prompt, params(4), session_id="s")
    core.step()
    core.step()
    out = core.abort("r1")
    assert out.finished and out.session_kv_tokens == 16 and out.session_token_ids == prompt
    assert core.runner.computed("r1") == [(0, 8), (8, 8)]
    assert len(core.held["s"].block_table) == 4

    out2, _ = run(core, "r2", prompt, 1, "s")
    assert out2.held_tokens == 16
    assert core.runner.computed("r2") == [(16, 8), (24, 6)]
    core.close_session("s")
    assert core.kv.num_free_blocks == core.kv.num_blocks


# ---- 7. background share -------------------------------------------------------------------------

def test_background_work_gets_its_share_of_every_step(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=256, max_num_batched_tokens=16, max_model_len=256,
                    background_share=0.25)
    seen = []

    def hook(out):
        sched = core.scheduler
        bg_work = any(s.group.background for s in sched.running) or bool(sched.waiting_bg)
        fg_work = any(not s.group.background for s in sched.running) or bool(sched.waiting)
        bg = sum(i.num_new_tokens for i in out.scheduled if i.seq.group.background)
        fg = sum(i.num_new_tokens for i in out.scheduled if not i.seq.group.background)
        bg_left = sum(s.num_tokens - s.num_computed_tokens for s in sched.running if s.group.background)
        seen.append((bg_work, fg_work, bg, fg, bg_left))

    core.runner.hook = hook
    for k in range(2):
        core.add_request(f"i{k}", list(range(100 + 50 * k, 130 + 50 * k)), params(20))
    outputs = core.step()
    assert seen[0][3] == 16  # no background work: interactive gets the whole budget
    core.open_session("ingest")
    core.add_request("bg", list(range(2000, 2200)), params(0), session_id="ingest", background=True)
    outputs += run_until_idle(core)
    both = [s for s in seen if s[0] and s[1]]
    assert len(both) > 10
    for bg_work, fg_work, bg, fg, bg_left in both:
        assert fg > 0 and bg >= min(4, bg_left)  # both classes scheduled; background >= its 25%
        assert fg <= 12 and bg + fg <= 16
    assert final(outputs, "bg").session_kv_tokens == 200
    assert all(tokens_of(outputs, f"i{k}") == [FILLER] * 20 for k in range(2))
    assert core.scheduler.num_preemptions == 0


def _never_recomputed(runner, request_id):
    chunks = runner.computed(request_id)
    return all(s == ps + pn for (ps, pn), (s, _) in zip(chunks, chunks[1:]))


def test_background_work_never_preempts_interactive_work(smollm_tokenizer):
    """The interactive request is the older one: when the pool runs dry the background one yields."""
    core = new_core(smollm_tokenizer, num_blocks=12, max_num_batched_tokens=16, max_model_len=48)
    core.add_request("i", list(range(10, 18)), params(20), background=False)  # grows to 7 blocks
    core.add_request("b", list(range(100, 120)), params(20), background=True)  # 10 blocks
    outputs = run_until_idle(core)
    assert core.scheduler.num_preemptions > 0
    assert _never_recomputed(core.runner, "i")
    assert tokens_of(outputs, "i") == [FILLER] * 20 and tokens_of(outputs, "b") == [FILLER] * 20
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_an_older_background_request_does_not_preempt_a_younger_interactive_one(smollm_tokenizer):
    """b (background) is older; i (interactive) runs out of blocks at token 28 while b, not yet
    scheduled in that step, holds 5 blocks: i must take them, not recompute itself."""
    core = new_core(smollm_tokenizer, num_blocks=12, max_num_batched_tokens=16, max_model_len=48)
    core.add_request("b", list(range(100, 104)), params(20), background=True)  # 6 blocks in the end
    outputs = core.step()
    core.add_request("i", list(range(10, 26)), params(16))  # 8 blocks in the end
    outputs += run_until_idle(core)
    assert tokens_of(outputs, "i") == [FILLER] * 16 and tokens_of(outputs, "b") == [FILLER] * 20
    assert core.scheduler.num_preemptions > 0
    assert _never_recomputed(core.runner, "i"), core.runner.computed("i")


# ---- 8. held sequences are never preempted -----------------------------------------------------

def test_stateless_requests_are_preempted_the_session_request_is_not(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=16, max_model_len=24, max_num_batched_tokens=64)
    core.open_session("s")
    core.add_request("s1", list(range(10, 22)), params(10), session_id="s")  # grows to 6 blocks
    for k in range(3):
        core.add_request(f"x{k}", list(range(100 + 20 * k, 108 + 20 * k)), params(12))  # 5 blocks each
    outputs = run_until_idle(core)
    assert core.scheduler.num_preemptions > 0
    assert _never_recomputed(core.runner, "s1")
    out = final(outputs, "s1")
    assert tokens_of(outputs, "s1") == [FILLER] * 10 and finish_of(out) is FinishReason.LENGTH
    assert out.session_kv_tokens == 21
    assert all(tokens_of(outputs, f"x{k}") == [FILLER] * 12 for k in range(3))
    core.close_session("s")
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_a_young_session_request_is_not_cut_short_by_older_stateless_ones(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=16, max_model_len=24, max_num_batched_tokens=64)
    core.open_session("s")
    for k in range(3):
        core.add_request(f"x{k}", list(range(100 + 20 * k, 108 + 20 * k)), params(12))  # 5 blocks each
    core.step()
    core.add_request("s1", list(range(10, 22)), params(10), session_id="s")  # grows to 6 blocks
    outputs = run_until_idle(core)
    assert tokens_of(outputs, "s1") == [FILLER] * 10


def test_a_pool_full_of_held_kv_ends_the_session_request_keeping_its_tokens(smollm_tokenizer):
    # 4 sessions, each growing to 4 blocks, in a 13-block pool: the held KV cannot all fit
    core = new_core(smollm_tokenizer, num_blocks=13, max_model_len=16)
    for k in range(4):
        core.open_session(f"s{k}")
        core.add_request(f"r{k}", list(range(10 + 10 * k, 13 + 10 * k)), params(12), session_id=f"s{k}")
    outputs = run_until_idle(core, max_steps=200)  # no hang
    assert core.scheduler.num_preemptions == 0  # held sequences are never preempted
    cut = []
    for k in range(4):
        out = final(outputs, f"r{k}")
        assert out.error is None and finish_of(out) is FinishReason.LENGTH
        got = tokens_of(outputs, f"r{k}")
        assert got == [FILLER] * len(got)
        assert out.session_token_ids == list(range(10 + 10 * k, 13 + 10 * k)) + got
        assert out.session_kv_tokens == len(out.session_token_ids) - 1
        assert _never_recomputed(core.runner, f"r{k}")
        if len(got) < 12:
            cut.append(k)
    assert cut  # someone ran out of room, and ended cleanly
    held = sum(len(core.held[f"s{k}"].block_table) for k in range(4))
    assert held == core.kv.num_blocks - core.kv.num_free_blocks
    # the cut session keeps its tokens: its next request reuses all of their KV
    k = cut[0]
    for j in range(4):
        if j != k:
            core.close_session(f"s{j}")
    ctx = core.held[f"s{k}"]
    kept = list(ctx.token_ids)
    num_kv = ctx.num_kv
    out, _ = run(core, "next", kept + [5], 1, f"s{k}")
    assert out.held_tokens == num_kv == len(kept) - 1
    assert core.runner.computed("next") == [(num_kv, 2)]
    core.close_session(f"s{k}")
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_session_requests_added_together_do_not_hang(smollm_tokenizer):
    """check_room counts what in-flight session requests will take (not the blocks they have so
    far): of two added together, the one the pool cannot also hold (beside one max_model_len
    request's worth) is refused at once (kv_pool_full) instead of waiting forever for room."""
    core = new_core(smollm_tokenizer, num_blocks=40, max_model_len=64)
    for k in range(2):
        core.open_session(f"s{k}")
    core.add_request("r0", list(range(10, 70)), params(0), session_id="s0")  # 15 blocks, none allocated yet
    with pytest.raises(InvalidRequest) as refused:
        core.add_request("r1", list(range(110, 170)), params(0), session_id="s1")
    assert refused.value.code == "kv_pool_full"
    outputs = run_until_idle(core, max_steps=200)
    assert final(outputs, "r0").error is None


# ---- 9. check_room ------------------------------------------------------------------------------

def test_check_room_refuses_what_sessions_leave_no_room_for(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=20, max_model_len=32)  # a longest request: 8 blocks
    for sid in ("a", "b", "c"):
        core.open_session(sid)
    out, _ = run(core, "a1", list(range(10, 14)), 27, "a")  # holds 30 tokens of KV: 8 blocks
    assert len(core.held["a"].block_table) == 8 and core.held_blocks() == 8
    # "c": 20 - 8 held by "a" - 8 for a longest request = 4 blocks
    assert core.session_room("c") == 4
    with pytest.raises(InvalidRequest) as e:
        core.add_request("c1", list(range(50, 66)), params(1), session_id="c")  # 17 tokens: 5 blocks
    assert e.value.code == "kv_pool_full"
    assert "c1" not in core.groups and core.held["c"].in_use is None
    core.add_request("c2", list(range(50, 66)), params(0), session_id="c")  # prefill only: 4 blocks fit
    core.abort("c2")
    core.add_request("c3", list(range(50, 65)), params(1), session_id="c")  # 16 tokens: 4 blocks fit
    core.abort("c3")
    # the session's own blocks do not count against it
    assert core.session_room("a") == 20 - core.held_blocks(but="a") - 8

    run(core, "b1", list(range(200, 204)), 27, "b")  # "b" holds 8 blocks too
    assert core.held_blocks() == 8 + 8 + len(core.held["c"].block_table)
    room = core.session_room(None)
    assert room == 20 - core.held_blocks()
    with pytest.raises(InvalidRequest) as e:
        core.add_request("x1", list(range(300, 300 + room * BS)), params(1))  # one token over
    assert e.value.code == "kv_pool_full" and "x1" not in core.groups
    core.add_request("x2", list(range(300, 300 + room * BS - 1)), params(1))  # fits exactly
    outputs = run_until_idle(core)
    assert final(outputs, "x2").error is None
    for sid in ("a", "b", "c"):
        core.close_session(sid)
    assert core.kv.num_free_blocks == core.kv.num_blocks


# ---- 10. busy / unknown sessions ------------------------------------------------------------------

def test_session_busy_and_not_found(smollm_tokenizer):
    core = new_core(smollm_tokenizer, num_blocks=32)
    core.open_session("s")
    with pytest.raises(InvalidRequest) as e:
        core.add_request("n2", list(range(10, 20)), SamplingParams(max_tokens=2, n=2), session_id="s")
    assert e.value.code == "session_busy" and "n2" not in core.groups and core.held["s"].in_use is None
    core.add_request("r1", list(range(10, 20)), params(4), session_id="s")
    with pytest.raises(InvalidRequest) as e:
        core.add_request("r2", list(range(10, 20)), params(4), session_id="s")
    assert e.value.code == "session_busy" and "r2" not in core.groups
    outputs = core.step()
    with pytest.raises(InvalidRequest) as e:  # still busy while running
        core.add_request("r3", list(range(10, 20)), params(0), session_id="s")
    assert e.value.code == "session_busy"
    with pytest.raises(InvalidRequest) as e:
        core.add_request("r4", list(range(10, 20)), params(4), session_id="nope")
    assert e.value.code == "session_not_found" and "r4" not in core.groups
    outputs += run_until_idle(core)
    assert tokens_of(outputs, "r1") == [FILLER] * 4
    run(core, "r5", list(range(10, 20)) + [FILLER] * 4, 1, "s")  # free again once r1 is done
    core.close_session("s")
    with pytest.raises(InvalidRequest) as e:
        core.add_request("r6", list(range(10, 20)), params(1), session_id="s")
    assert e.value.code == "session_not_found"
    assert core.kv.num_free_blocks == core.kv.num_blocks
