"""One sample being generated: its tokens, how many are computed, its blocks, its text state."""

from __future__ import annotations

from dataclasses import dataclass, field

from layerserve.engine.request import FinishReason, SamplingParams, SequenceStatus, TokenLogprob


@dataclass(slots=True, eq=False)
class RequestGroup:
    """A request: n sequences (samples) sharing one prompt."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    seqs: list["Sequence"] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (at its first admission)
    prefix_counted: bool = False  # its prompt lookup is in the prefix-cache stats (once per request)
    forked: bool = False  # seqs[1:] (n>1) received the prompt's KV from seqs[0]
    background: bool = False  # lower priority class (session ingest, flash, warm): a share of each step
    num_held_tokens: int = 0  # prompt tokens a session's held KV served (part of num_cached_tokens)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(s.token_ids) - s.num_prompt_tokens for s in self.seqs)


@dataclass(slots=True, eq=False)
class Sequence:
    """Token-centric state (vLLM v1): the scheduler only compares num_computed_tokens with num_tokens.

    A fresh prompt, a prefix-cache hit, a prefill chunk and a decode step are all "compute the
    tokens from num_computed_tokens to num_tokens"; nothing needs a phase flag.
    """

    seq_id: int
    group: RequestGroup
    index: int  # choice index within the request
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    seed: int  # the request's 64-bit seed; the sampler keys noise by (seed, index, step)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained keys of full blocks of token_ids
    num_indexed_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    finish_reported: bool = False  # the caller has seen the finish reason
    detok: object | None = None  # IncrementalDetokenizer, created by the output processor
    text: str = ""  # generated text (stop strings cut)
    num_text_sent: int = 0  # chars of `text` already handed to the caller
    logits_mask: object | None = None  # LogitsMask (grammar) of this sample
    stop_matcher: object | None = None  # StopStringMatcher when the request has stop strings
    penalty_state: object | None = None  # the runner's incremental token counts (penalties only)
    draft_index: object | None = None  # NgramIndex of its tokens once the scheduler drafts for it
    held: object | None = None  # the session's HeldContext whose blocks this sequence has (engine/held.py)
    # Pending output since the last RequestOutput:
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def prefill_only(self) -> bool:
        """max_tokens 0: compute the prompt's KV, sample nothing (warm turns, session ingest)."""
        return self.group.params.max_tokens == 0
