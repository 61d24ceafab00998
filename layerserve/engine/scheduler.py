"""Token-budget scheduler: continuous batching, chunked prefill, preemption by recompute.

Each step: running sequences first (oldest first), each gets `min(num_tokens - num_computed_tokens,
budget)` tokens; then waiting sequences are admitted while budget, sequence slots and KV blocks
last. A running sequence that needs a block when the pool is empty preempts the youngest running
sequence (its blocks go back to the pool -- and stay in the prefix cache -- and it is recomputed
later). The oldest request always progresses, so nothing deadlocks and nothing is dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from layerserve.config import SchedulerConfig
from layerserve.engine.draft import NgramIndex, PromptLookup
from layerserve.engine.held import give_back
from layerserve.engine.kv_cache import KVCacheManager
from layerserve.engine.request import SequenceStatus
from layerserve.engine.sequence import RequestGroup, Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens (draft included)
    draft: list[int] = field(default_factory=list)  # drafted tokens after the sequence's last, computed too


@dataclass(slots=True)
class SchedulerOutput:
    """What the runner executes in one step."""

    scheduled: list[ScheduledSeq]
    # (sequence that gets a new token, index into `scheduled` whose last token's logits it samples).
    # n>1 children sample from their parent's row on the step the prompt completes.
    samples: list[tuple[Sequence, int]]
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks, copied after the forward
    out_of_room: list[Sequence] = field(default_factory=list)  # session sequences the full pool ends now

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, drafter: PromptLookup | None = None) -> None:
        """`drafter`: proposes draft tokens for decoding sequences (speculative decoding); None: never."""
        self.config = config
        self.kv = kv
        self.drafter = drafter
        self.waiting: deque[Sequence] = deque()
        self.waiting_bg: deque[Sequence] = deque()  # background class (SchedulerConfig.background_share)
        self._out_of_room: list[Sequence] = []  # this step's session sequences the full pool ends
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, group: RequestGroup) -> None:
        # children join when the prompt's KV is forked to them
        (self.waiting_bg if group.background else self.waiting).append(group.seqs[0])

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.waiting_bg or self.running)

    def schedule(self) -> SchedulerOutput:
        """Interactive sequences first, then background ones (session ingest, flash queries, warm
        turns). Background work has `background_share` of the budget whenever it has work, so it
        is never starved, and takes whatever the interactive class leaves."""
        total = self.config.max_num_batched_tokens
        background = any(s.group.background for s in self.running) or bool(self.waiting_bg)
        reserve = int(total * self.config.background_share) if background else 0
        scheduled: list[ScheduledSeq] = []
        self._out_of_room: list[Sequence] = []
        budget, preempted = self._schedule_running(scheduled, total - reserve, background=False)
        if not preempted:
            budget = self._admit(self.waiting, scheduled, budget)
        budget, preempted_bg = self._schedule_running(scheduled, budget + reserve, background=True)
        if not (preempted or preempted_bg):
            self._admit(self.waiting_bg, scheduled, budget)
        samples, copies = self._samples_and_forks(scheduled)
        return SchedulerOutput(scheduled, samples, copies, self._out_of_room)

    def _schedule_running(self, scheduled: list[ScheduledSeq], budget: int, *, background: bool) -> tuple[int, bool]:
        """Give the running sequences of one class their tokens (oldest first). A sequence that
        needs a block when the pool is empty preempts the youngest running sequence that holds no
        session context and is not scheduled yet; when there is none it preempts itself -- unless
        it holds a session's context, which must never be lost: then the pool is full of held KV
        and it ends (finish reason length) keeping what it computed."""
        preempted = False
        done = {id(item.seq) for item in scheduled}
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.group.background != background or id(seq) in done:
                i += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            draft = self._draft(seq, budget - 1) if num_new == 1 and self.drafter is not None else []
            if draft:  # a draft only takes blocks that are free: it never preempts
                need = self.kv.blocks_needed(seq.num_computed_tokens + 1 + len(draft)) - len(seq.block_table)
                if need <= self.kv.num_free_blocks:
                    seq.block_table += self.kv.allocate(need)
                    scheduled.append(ScheduledSeq(seq, 1 + len(draft), draft))
                    done.add(id(seq))
                    budget -= 1 + len(draft)
                    i += 1
                    continue
            need = self.kv.blocks_needed(seq.num_computed_tokens + num_new) - len(seq.block_table)
            preempted_here = False
            while need > self.kv.num_free_blocks:
                victim = self._victim(seq, done, background)
                if victim is None and seq.held is not None:
                    # a session's sequence outranks stateless ones scheduled before it in this step
                    victim = self._victim(seq, set(), background)
                    if victim is not None:
                        item = next(it for it in scheduled if it.seq is victim)
                        scheduled.remove(item)
                        budget += item.num_new_tokens
                if victim is None:
                    break
                self.running.remove(victim)
                self._preempt(victim)
                preempted = preempted_here = True
            if preempted_here:
                i = self.running.index(seq)  # a victim may have been ahead of it
            if need > self.kv.num_free_blocks:
                self.running.pop(i)
                preempted = True
                if seq.held is None:
                    self._preempt(seq)
                else:
                    self._out_of_room.append(seq)
                continue
            seq.block_table += self.kv.allocate(need)
            scheduled.append(ScheduledSeq(seq, num_new))
            done.add(id(seq))
            budget -= num_new
            i += 1
        return budget, preempted

    def _victim(self, needy: Sequence, done: set[int], background: bool) -> Sequence | None:
        """The youngest running sequence that may be preempted for `needy`: not scheduled in this
        step yet, holding no session's context, and background work if `needy` is background
        (background work never preempts interactive work)."""
        for seq in reversed(self.running):
            if seq is not needy and seq.held is None and id(seq) not in done and \
                    (seq.group.background or not background):
                return seq
        return None

    def _draft(self, seq: Sequence, room: int) -> list[int]:
        """Draft tokens for a decoding sequence: none while the batch is too wide for drafting to
        pay, none past max_tokens or the context, and under a grammar only what it admits."""
        drafter = self.drafter
        cfg = drafter.config
        if len(self.running) > cfg.max_batch:
            return []
        limit = min(cfg.num_draft_tokens, room, self.config.max_model_len - seq.num_tokens - 1)
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
        mask = seq.logits_mask
        if limit <= 0 or (mask is not None and not hasattr(mask, "valid_prefix")):
            return []
        if seq.draft_index is None:
            seq.draft_index = NgramIndex()
        if drafter.waiting(seq.draft_index):
            return []
        draft = drafter.propose(seq.token_ids, seq.draft_index, limit)
        if draft and mask is not None:
            draft = draft[:mask.valid_prefix(draft)]
        return draft

    def _admit(self, waiting: deque[Sequence], scheduled: list[ScheduledSeq], budget: int) -> int:
        while waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = waiting[0]
            if not seq.block_table and seq.num_computed_tokens == 0:
                cached = self.kv.match_prefix(seq.token_ids, seq.block_hashes)
                seq.block_table = cached
                seq.num_computed_tokens = len(cached) * self.kv.block_size
                seq.num_indexed_blocks = len(cached)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self.kv.blocks_needed(seq.num_computed_tokens + num_new) - len(seq.block_table)
            if need > self.kv.num_free_blocks:
                if seq.held is None:
                    self._release(seq)  # let its cached prefix be evictable while it waits
                elif not self.running:  # nothing running will free a block: the pool is full of held KV
                    waiting.popleft()
                    self._out_of_room.append(seq)
                    continue
                break
            seq.block_table += self.kv.allocate(need)
            group = seq.group
            if seq.index == 0 and not group.prefix_counted:
                # Usage is billing: count what this admission really reuses, once per request (a
                # match that had to wait may be evicted meanwhile; a preempted rerun is not a new query).
                group.prefix_counted = True
                group.num_cached_tokens = seq.num_computed_tokens
                held = group.num_held_tokens  # a session's own KV is not a prefix-cache lookup
                self.kv.record_query(len(group.prompt_ids) - held, seq.num_computed_tokens - held)
            waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return budget

    def _samples_and_forks(self, scheduled: list[ScheduledSeq]) -> tuple[list[tuple[Sequence, int]], list[tuple[int, int]]]:
        samples: list[tuple[Sequence, int]] = []
        copies: list[tuple[int, int]] = []
        for row, item in enumerate(scheduled):
            seq = item.seq
            if seq.num_computed_tokens + item.num_new_tokens < seq.num_tokens or seq.prefill_only:
                continue  # a prefill chunk that does not reach the end (or a prefill-only request): no sample
            samples.append((seq, row))
            group = seq.group
            if seq.index == 0 and len(group.seqs) > 1 and not group.forked:
                group.forked = True
                for child in group.seqs[1:]:
                    if self._fork(seq, child, seq.num_computed_tokens + item.num_new_tokens, copies):
                        samples.append((child, row))
        return samples, copies

    def _fork(self, parent: Sequence, child: Sequence, num_computed: int, copies: list[tuple[int, int]]) -> bool:
        """Give `child` the parent's prompt KV: full blocks shared, the partial last block copied."""
        if child.finished:
            return False
        num_full = num_computed // self.kv.block_size
        partial = num_computed % self.kv.block_size != 0
        if partial and self.kv.num_free_blocks < 1 or len(self.running) >= self.config.max_num_seqs:
            self.waiting.append(child)  # no room to fork now: it recomputes (mostly from the cache)
            return False
        self.kv.share(parent.block_table[:num_full])
        child.block_table = list(parent.block_table[:num_full])
        if partial:
            (dst,) = self.kv.allocate(1)
            copies.append((parent.block_table[num_full], dst))
            child.block_table.append(dst)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = num_computed
        child.num_indexed_blocks = min(parent.num_indexed_blocks, num_full)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        (self.waiting_bg if seq.group.background else self.waiting).appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.kv.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_indexed_blocks = 0

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from the queues and free its blocks (kept in the cache)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.waiting_bg:
            self.waiting_bg.remove(seq)
        seq.num_indexed_blocks = self.kv.cache_full_blocks(seq.block_table, seq.token_ids, seq.num_computed_tokens,
                                                           seq.block_hashes, seq.num_indexed_blocks)
        if seq.held is not None:  # the session takes its blocks back, with what was computed
            give_back(self.kv, seq.held, seq.token_ids, seq.block_table, seq.block_hashes,
                      seq.num_computed_tokens, seq.num_indexed_blocks)
            seq.block_table = []
            seq.num_computed_tokens = 0
        else:
            self._release(seq)
        seq.status = SequenceStatus.FINISHED
