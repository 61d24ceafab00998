"""EngineCore.step(): schedule -> execute -> update. Synchronous; no asyncio, no HTTP."""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass

from layerserve.config import EngineConfig
from layerserve.engine.draft import DraftStats, PromptLookup
from layerserve.engine.held import HeldContext, take_over
from layerserve.engine.kv_cache import KVCacheManager
from layerserve.engine.request import FinishReason, RequestOutput, SamplingParams
from layerserve.engine.scheduler import Scheduler
from layerserve.engine.sequence import RequestGroup, Sequence
from layerserve.engine.output import OutputProcessor

log = logging.getLogger("layerserve.engine")

# What a failed request reports. The exception itself goes to the log, never to clients.
INTERNAL_ERROR = "internal engine error"


class InvalidRequest(ValueError):
    """The request cannot be served as asked (user error); the message says why."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of blocks held by running sequences
    num_free_blocks: int
    num_blocks: int
    num_cached_blocks: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of which found
    num_preemptions: int
    num_steps: int
    num_failed_batches: int  # steps whose forward or update raised (their requests failed)
    spec_draft_tokens: int = 0  # draft tokens computed (speculative decoding)
    spec_accepted_tokens: int = 0  # of which kept
    num_held_blocks: int = 0  # blocks sessions hold


class EngineCore:
    def __init__(self, config: EngineConfig, runner, tokenizer, num_blocks: int) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = config.scheduler.max_model_len
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        spec = config.speculative
        drafter = PromptLookup(spec) if spec is not None and spec.num_draft_tokens > 0 else None
        self.scheduler = Scheduler(config.scheduler, self.kv, drafter)
        self.outputs = OutputProcessor(tokenizer, self.max_model_len)
        self.groups: dict[str, RequestGroup] = {}
        self._seq_ids = itertools.count()
        self._rng = random.Random()
        self.num_steps = 0
        self.num_failed_batches = 0
        self.held: dict[str, HeldContext] = {}  # session id -> its KV between requests
        self._early: list[RequestOutput] = []  # outputs of requests that ended when added

    # ---- sessions ------------------------------------------------------------------------
    def open_session(self, session_id: str) -> None:
        """An empty held context for a session (a session that has one keeps it)."""
        self.held.setdefault(session_id, HeldContext(session_id))

    def close_session(self, session_id: str) -> None:
        """Free a session's KV (at once, or when the request that has it ends)."""
        ctx = self.held.pop(session_id, None)
        if ctx is None:
            return
        if ctx.in_use is not None:
            ctx.closing = True
        else:
            self.kv.free(ctx.block_table)
            ctx.block_table = []

    def held_blocks(self, but: str | None = None) -> int:
        """Blocks sessions hold (optionally leaving one session out). The event loop asks too, for an
        early refusal: it reads a snapshot of the dict, which the engine thread may be changing."""
        return sum(ctx.num_blocks(self.kv) for sid, ctx in tuple(self.held.items()) if sid != but)

    def session_room(self, session_id: str | None) -> int:
        """Blocks a request may count on: the pool minus what (other) sessions hold; a session
        request also leaves one longest request's worth for everyone else."""
        room = self.kv.num_blocks - self.held_blocks(but=session_id)
        if session_id is not None:
            room -= self.kv.blocks_needed(self.max_model_len)
        return room

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest when the request can never be served."""
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="messages")
        if max(prompt_ids) >= self.runner.vocab_size or min(prompt_ids) < 0:
            raise InvalidRequest("prompt contains token ids outside the vocabulary", param="prompt")
        max_tokens = params.max_tokens or 0
        if len(prompt_ids) + max_tokens > self.max_model_len or len(prompt_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} in the "
                f"completion). Please reduce the length of the prompt or of the completion (max_tokens).",
                code="context_length_exceeded",
                param="messages",
            )

    def check_room(self, prompt_ids: list[int], params: SamplingParams, session_id: str | None) -> None:
        """Refuse (code kv_pool_full) a request whose prompt can never get its blocks because
        sessions hold the pool."""
        need = self.kv.blocks_needed(len(prompt_ids) + (1 if params.max_tokens != 0 else 0))
        room = self.session_room(session_id)
        if need > room:
            held = self.held_blocks(but=session_id) * self.kv.block_size
            what = "this session" if session_id is not None else "this request"
            raise InvalidRequest(
                f"The KV pool is full: sessions hold {held} of its {self.kv.num_blocks * self.kv.block_size} "
                f"token slots, and {what} needs {len(prompt_ids) + 1}. Delete sessions or start the server "
                f"with a larger --kv-cache-memory.", code="kv_pool_full", param="messages")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    session_id: str | None = None, background: bool = False) -> RequestGroup:
        """Queue a request. With `session_id` it runs on that session's held KV (the common prefix is
        reused, only the tail computed) and the session holds the result afterwards; n must be 1.
        `background`: the lower priority class."""
        self.validate(prompt_ids, params)
        if request_id in self.groups:
            raise InvalidRequest(f"duplicate request id {request_id}")
        ctx = None
        if session_id is not None:
            ctx = self.held.get(session_id)
            if ctx is None:
                raise InvalidRequest(f"no session {session_id}", code="session_not_found")
            if ctx.in_use is not None or params.n != 1:
                raise InvalidRequest(f"session {session_id} is busy", code="session_busy")
        self.check_room(prompt_ids, params, session_id)
        group = RequestGroup(request_id, list(prompt_ids), params, time.monotonic(), background=background)
        # Any integer seed is accepted; the sampler keys its noise by all 64 bits and the choice index.
        seed = (params.seed if params.seed is not None else self._rng.getrandbits(64)) & ((1 << 64) - 1)
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), group, index, list(prompt_ids), len(prompt_ids), seed)
            self.outputs.init_sequence(seq)
            group.seqs.append(seq)
        self.groups[request_id] = group
        if ctx is not None:
            self._attach(group.seqs[0], ctx)
            if group.seqs[0].prefill_only and group.seqs[0].num_computed_tokens == len(prompt_ids):
                self._finish_now(group, FinishReason.LENGTH)  # the session holds all of it already
                return group
        self.scheduler.add(group)
        return group

    def _attach(self, seq: Sequence, ctx: HeldContext) -> None:
        """Give `seq` the session's blocks for the prefix it shares with the held tokens."""
        max_reuse = seq.num_tokens if seq.prefill_only else seq.num_tokens - 1  # a sample needs a computed token
        attached = take_over(self.kv, ctx, seq.token_ids, max_reuse)
        seq.block_table = attached.block_table
        seq.block_hashes = attached.block_hashes
        seq.num_computed_tokens = attached.num_computed
        seq.num_indexed_blocks = attached.num_indexed_blocks
        seq.held = ctx
        seq.group.num_held_tokens = attached.num_computed
        seq.group.num_cached_tokens = attached.num_computed
        ctx.in_use = seq

    def _finish_now(self, group: RequestGroup, reason: FinishReason) -> None:
        for seq in group.seqs:
            seq.finish_reason = reason
            self.scheduler.finish(seq)
        self._early.append(self._output(group))
        del self.groups[group.request_id]

    def _output(self, group: RequestGroup, error: str | None = None) -> RequestOutput:
        out = self.outputs.make_output(group, error=error)
        out.held_tokens = group.num_held_tokens
        ctx = group.seqs[0].held
        if group.finished and ctx is not None:
            out.session_token_ids = list(ctx.token_ids)
            out.session_kv_tokens = ctx.num_kv
        return out

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> RequestOutput | None:
        """Finish a request now, freeing its blocks. Returns its last output (None if unknown)."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for seq in group.seqs:
            if not seq.finished:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
        return self._output(group)

    # ---- the loop ------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._early)

    def step(self) -> list[RequestOutput]:
        """One scheduling step. A fault while running the batch (the forward pass, sampling, a
        grammar, detokenizing) fails only the requests in that batch, with an error output, and
        frees their blocks; requests that were not in it go on at the next step."""
        early, self._early = self._early, []
        out = self.scheduler.schedule()
        self.num_steps += 1
        early += self._end_out_of_room(out.out_of_room)
        if out.is_empty:
            return early
        try:
            return early + self._run_batch(out)
        except Exception:
            log.exception("engine step failed; failing the %d request(s) in its batch", len(out.scheduled))
            self.num_failed_batches += 1
            batch = {item.seq.group.request_id for item in out.scheduled}
            return self.fail(batch, INTERNAL_ERROR)

    def _run_batch(self, out) -> list[RequestOutput]:
        result = self.runner.execute(out)
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens - len(item.draft)  # draft tokens count once kept
            seq.num_indexed_blocks = self.kv.cache_full_blocks(
                seq.block_table, seq.token_ids, seq.num_computed_tokens, seq.block_hashes, seq.num_indexed_blocks
            )
        touched: dict[str, RequestGroup] = {}
        for (seq, row), token_ids, logprobs in zip(out.samples, result.token_ids, result.logprobs):
            if seq.finished:
                continue
            item = out.scheduled[row]
            if item.draft and item.seq is seq:
                self.scheduler.drafter.record(seq.draft_index, len(item.draft), len(token_ids) - 1)
            finished = False
            for j, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
                finished = self.outputs.append_token(seq, token_id, logprob)
                if j < len(token_ids) - 1:  # a kept draft token: its KV was computed this step
                    seq.num_computed_tokens += 1
                if finished:
                    break
            if len(token_ids) > 1:
                seq.num_indexed_blocks = self.kv.cache_full_blocks(
                    seq.block_table, seq.token_ids, seq.num_computed_tokens, seq.block_hashes, seq.num_indexed_blocks
                )
            if finished:
                self.scheduler.finish(seq)
            touched[seq.group.request_id] = seq.group
        for item in out.scheduled:  # prefill-only requests end once their prompt has KV
            seq = item.seq
            if seq.prefill_only and not seq.finished and seq.num_computed_tokens >= seq.num_tokens:
                seq.finish_reason = FinishReason.LENGTH
                self.scheduler.finish(seq)
                touched[seq.group.request_id] = seq.group
        outputs = []
        for request_id, group in touched.items():
            outputs.append(self._output(group))
            if group.finished:
                del self.groups[request_id]
        return outputs

    def _end_out_of_room(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """Session sequences the pool (full of held KV) cannot grow: they end as if the context
        were full, and their session keeps what they computed."""
        outputs = []
        for seq in seqs:
            log.warning("request %s: the KV pool is full of session state; ending it", seq.group.request_id)
            seq.finish_reason = FinishReason.LENGTH
            self.scheduler.finish(seq)
            group = seq.group
            if group.finished and group.request_id in self.groups:
                outputs.append(self._output(group))
                del self.groups[group.request_id]
        return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After a fault outside any batch (in scheduling): fail every request in flight."""
        return self.fail(list(self.groups), message)

    def fail(self, request_ids, message: str) -> list[RequestOutput]:
        """Finish these requests with an error and free their blocks."""
        outputs = []
        for request_id in request_ids:
            group = self.groups.pop(request_id, None)
            if group is None:
                continue
            for seq in group.seqs:
                if not seq.finished:
                    seq.finish_reason = FinishReason.ERROR
                    self.scheduler.finish(seq)
            outputs.append(self._output(group, error=message))
        return outputs

    def stats(self) -> EngineStats:
        drafter = self.scheduler.drafter
        drafted = drafter.stats if drafter is not None else DraftStats()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self.scheduler.waiting_bg),
            kv_usage=self.kv.usage(),
            num_free_blocks=self.kv.num_free_blocks,
            num_blocks=self.kv.num_blocks,
            num_cached_blocks=self.kv.num_cached_blocks,
            prefix_queries=self.kv.stats.queries,
            prefix_hits=self.kv.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            num_failed_batches=self.num_failed_batches,
            spec_draft_tokens=drafted.drafted,
            spec_accepted_tokens=drafted.accepted,
            num_held_blocks=self.held_blocks(),
        )
