"""Logits + per-row parameters -> token ids (and logprobs), vectorized over the batch.

Order: logit bias and grammar mask, then penalties (repetition, presence, frequency), then greedy
argmax or temperature -> top-k -> top-p -> min-p -> an exponential race. The race's noise is a
counter-based hash of (seed, choice index, step, token id), so a seeded sample is reproducible
whatever else is in the batch, with no per-request generator objects.

The noise is a uniform strictly inside (0, 1): at exactly 1.0, `-log(u)` is 0 and a token whose
probability was zeroed (top-k/p, min-p, a grammar mask) scores 0/0 = NaN, which `argmax` picks.
Zeroed tokens also score -1 in the race, so they can never win even against a tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

def _i32(x: int) -> int:
    """An unsigned 32-bit constant as the signed int32 torch stores."""
    return x - (1 << 32) if x >= 1 << 31 else x


_MASK64 = (1 << 64) - 1
_GOLDEN32 = _i32(0x9E3779B1)
_FMIX1 = _i32(0x85EBCA6B)
_FMIX2 = _i32(0xC2B2AE35)


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters for one step; rows follow the step's `samples` order."""

    temperature: torch.Tensor  # (S,) float; rows with 0 are greedy
    top_k: torch.Tensor  # (S,) long; V when off
    top_p: torch.Tensor  # (S,) float
    min_p: torch.Tensor  # (S,) float
    keys: torch.Tensor  # (S,) int64: noise_key(seed, choice index, output position) per row
    all_greedy: bool
    needs_filter: bool  # some row uses top-k, top-p or min-p
    # Penalties (None when no row uses them): token counts over outputs and presence over prompt+outputs.
    output_counts: torch.Tensor | None = None  # (S, V) float
    seen_mask: torch.Tensor | None = None  # (S, V) bool: in prompt or output (repetition penalty)
    presence: torch.Tensor | None = None  # (S,)
    frequency: torch.Tensor | None = None  # (S,)
    repetition: torch.Tensor | None = None  # (S,)
    bias: torch.Tensor | None = None  # (S, V) additive logit bias; -inf where a grammar forbids
    max_logprobs: int | None = None  # largest top-k of logprobs asked in the batch; None: nobody asked


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # (S,) long
    logprobs: torch.Tensor | None  # (S,) logprob of the chosen token
    top_ids: torch.Tensor | None  # (S, K)
    top_logprobs: torch.Tensor | None  # (S, K)


def mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit ints whose every output bit depends on every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_key(seed: int, index: int, step: int) -> int:
    """The 64-bit noise key of one sample's step, as the signed int64 torch stores.

    All 64 bits of the seed count, and the choice index is hashed in its own round, so choice i of
    seed s shares nothing with choice 0 of seed s + i (as it did when per-choice seeds were s + i).
    """
    k = mix64((mix64(mix64(seed & _MASK64) + index) + step) & _MASK64)
    return k - (1 << 64) if k >= 1 << 63 else k


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int32 (wrapping multiplies; shifts masked to be logical)."""
    h = (h ^ ((h >> 16) & 0xFFFF)) * _FMIX1
    h = (h ^ ((h >> 13) & 0x7FFFF)) * _FMIX2
    return h ^ ((h >> 16) & 0xFFFF)


def _int32(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of an int64 tensor as int32 (two's complement)."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def hash_uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """(S, V) uniforms strictly inside (0, 1) from the rows' 64-bit keys and the token ids.

    Two rounds of murmur3's 32-bit finalizer, one per key half: int32 arithmetic is 3x cheaper
    than a 64-bit hash over a 49k vocabulary. 23 bits per uniform, centred in their cells:
    the extremes are 2^-24 and 1 - 2^-24, both exact in float32, so -log(u) is finite and > 0.
    """
    lo, hi = _int32(keys).unsqueeze(1), _int32(keys >> 32).unsqueeze(1)
    h = _fmix32(lo ^ (torch.arange(vocab, dtype=torch.int32) * _GOLDEN32))
    h = _fmix32(h + hi)
    return (((h >> 9) & 0x7FFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.repetition is not None and b.seen_mask is not None:
        rep = b.repetition.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(b.seen_mask, penalized, logits)
    if b.output_counts is not None:
        logits = logits - b.frequency.unsqueeze(1) * b.output_counts
        logits = logits - b.presence.unsqueeze(1) * (b.output_counts > 0).float()
    return logits


def filter_probs(probs: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Zero out tokens outside top-k, top-p and min-p, per row."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1]).unsqueeze(0)
    keep = ranks < b.top_k.unsqueeze(1)
    cum = sorted_probs.cumsum(dim=-1)
    keep &= (cum - sorted_probs) < b.top_p.unsqueeze(1)  # keep the token that crosses top_p
    keep &= sorted_probs >= b.min_p.unsqueeze(1) * sorted_probs[:, :1]
    keep[:, 0] = True
    kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)
    return kept


def _rows(b: SamplingBatch, rows: torch.Tensor) -> SamplingBatch:
    """The sampling parameters of a subset of rows (what the random path needs)."""
    return SamplingBatch(temperature=b.temperature[rows], top_k=b.top_k[rows], top_p=b.top_p[rows],
                         min_p=b.min_p[rows], keys=b.keys[rows], all_greedy=False,
                         needs_filter=b.needs_filter)


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    """logits: (S, V) float32, the model's raw output."""
    raw = logits
    if b.bias is not None:
        logits = logits + b.bias
    logits = apply_penalties(logits, b)
    greedy_ids = logits.argmax(dim=-1)
    if b.all_greedy:
        token_ids = greedy_ids
    else:
        rows = (b.temperature > 1e-5).nonzero().squeeze(1)  # only sampled rows pay for noise
        sb = _rows(b, rows)
        probs = torch.softmax(logits[rows] / sb.temperature.unsqueeze(1), dim=-1)
        if sb.needs_filter:
            probs = filter_probs(probs, sb)
        noise = -torch.log(hash_uniform(sb.keys, probs.shape[-1]))  # Exp(1), finite and > 0
        race = torch.where(probs > 0, probs / noise, -1.0)  # a zeroed token can never win
        token_ids = greedy_ids.clone()
        token_ids[rows] = race.argmax(dim=-1)  # exponential race == sampling from probs
    if b.max_logprobs is None:
        return SamplerOutput(token_ids, None, None, None)
    logprobs = torch.log_softmax(raw, dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_lp, top_ids = logprobs.topk(max(b.max_logprobs, 1), dim=-1)
    return SamplerOutput(token_ids, chosen, top_ids, top_lp)
