"""Requests, sampling parameters and the output objects the engine hands back.

These dataclasses are the contract between the engine and its callers (the API layer and
`LLM.generate`). Nothing here knows about tensors or HTTP.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # the caller aborted (client disconnect, timeout)
    ERROR = "error"  # the engine failed while running this request


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class LogitsMask(Protocol):
    """Per-sequence constraint (grammar). The sampler asks for the allowed tokens before each
    sample and reports the chosen token afterwards."""

    def allowed_mask(self) -> Any:
        """A (V,) bool torch tensor, True where a token may come next (V may be smaller than the
        model's padded vocabulary: ids past it are never allowed); None when anything is allowed."""

    def accept(self, token_id: int) -> None:
        """Advance the constraint by the token that was sampled."""

    def is_finished(self) -> bool:
        """True once the constraint admits only end-of-sequence."""

    # Optional, for speculative decoding (a mask without them gets no drafts):
    # valid_prefix(tokens) -> int: how many leading tokens the constraint admits from here;
    # draft_masks(tokens) -> list of len(tokens) + 1 masks, after each prefix, state unchanged.


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. Defaults follow the OpenAI API."""

    max_tokens: int | None = 16  # None: up to the context length; 0: prefill only (no token sampled)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None  # None: a fresh random seed per request
    n: int = 1  # parallel samples sharing the prompt's KV
    logprobs: int | None = None  # None: off; 0: the chosen token only; k: also the top-k alternatives
    stop: list[str] = field(default_factory=list)  # stop strings; not included in the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Builds one LogitsMask per sample (grammar-constrained decoding); None: unconstrained.
    logits_mask_factory: object | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one generated token and, if asked, its top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass(slots=True)
class CompletionDelta:
    """What one sample (choice) produced since the last output."""

    index: int  # choice index, 0..n-1
    token_ids: list[int]
    text: str  # text delta; never half a UTF-8 character; stop strings removed
    logprobs: list[TokenLogprob] | None  # one per token in token_ids when logprobs were asked
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that finished it


@dataclass(slots=True)
class RequestOutput:
    """One update for a request: the deltas of the choices that moved, and usage so far."""

    request_id: str
    deltas: list[CompletionDelta]
    prompt_tokens: int
    completion_tokens: int  # summed over all choices
    cached_tokens: int  # prompt tokens served from cache (a session's held KV and the prefix cache)
    finished: bool  # True on the last output of the request (all choices finished)
    error: str | None = None  # set when the engine failed this request
    error_code: str | None = None  # with `error`: why the engine refused it (InvalidRequest.code); None: a fault
    held_tokens: int = 0  # of cached_tokens, those a session's held KV served
    session_token_ids: list[int] | None = None  # on a session request's last output: the tokens it now holds
    session_kv_tokens: int | None = None  # ... and of those, how many have KV
