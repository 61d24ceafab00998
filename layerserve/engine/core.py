"""EngineCore.step(): schedule -> execute -> update. Synchronous; no asyncio, no HTTP."""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass

from layerserve.config import EngineConfig
from layerserve.engine.draft import DraftStats, PromptLookup
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

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestGroup:
        self.validate(prompt_ids, params)
        if request_id in self.groups:
            raise InvalidRequest(f"duplicate request id {request_id}")
        group = RequestGroup(request_id, list(prompt_ids), params, time.monotonic())
        # Any integer seed is accepted; the sampler keys its noise by all 64 bits and the choice index.
        seed = (params.seed if params.seed is not None else self._rng.getrandbits(64)) & ((1 << 64) - 1)
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), group, index, list(prompt_ids), len(prompt_ids), seed)
            self.outputs.init_sequence(seq)
            group.seqs.append(seq)
        self.groups[request_id] = group
        self.scheduler.add(group)
        return group

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> RequestOutput | None:
        """Finish a request now, freeing its blocks. Returns its last output (None if unknown)."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for seq in group.seqs:
            if not seq.finished:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
        return self.outputs.make_output(group, error=None)

    # ---- the loop ------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        """One scheduling step. A fault while running the batch (the forward pass, sampling, a
        grammar, detokenizing) fails only the requests in that batch, with an error output, and
        frees their blocks; requests that were not in it go on at the next step."""
        out = self.scheduler.schedule()
        self.num_steps += 1
        if out.is_empty:
            return []
        try:
            return self._run_batch(out)
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
        outputs = []
        for request_id, group in touched.items():
            outputs.append(self.outputs.make_output(group))
            if group.finished:
                del self.groups[request_id]
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
            outputs.append(self.outputs.make_output(group, error=message))
        return outputs

    def stats(self) -> EngineStats:
        drafter = self.scheduler.drafter
        drafted = drafter.stats if drafter is not None else DraftStats()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
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
        )
