"""SchedulerOutput -> batch tensors -> forward -> sampled tokens.

All index tensors of a step (positions, slot mapping, context slots, masks) are built here once
and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerserve.engine.request import TokenLogprob
from layerserve.engine.scheduler import SchedulerOutput
from layerserve.engine.sequence import Sequence
from layerserve.model.attention import AttentionMetadata, DecodeGroup, PrefillChunk, group_by_length
from layerserve.model.compiled_step import CompiledStep, StepRows
from layerserve.model.cpu_load import ContentionMonitor
from layerserve.model.sampler import SamplingBatch, noise_key, sample


@dataclass(slots=True)
class ModelOutput:
    """Per entry of SchedulerOutput.samples: its new tokens (one, or with a draft, the draft tokens
    kept and the token sampled after them) and, when asked, their logprobs."""

    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprob | None]]


def kv_bytes_per_token(model, kv_dtype: torch.dtype | None = None) -> int:
    c = model.config
    return c.num_layers * 2 * c.num_kv_heads * c.head_dim * torch.finfo(kv_dtype or model.dtype).bits // 8


@dataclass(slots=True)
class PenaltyState:
    """A sequence's token counts, kept up to date a step at a time: rebuilding them from every
    token each step cost O(length) per step on the engine thread."""

    counts: torch.Tensor  # (V,) float: occurrences of each token in the output
    seen: torch.Tensor  # (V,) bool: in the prompt or the output
    num_counted: int  # tokens of token_ids already in `counts` / `seen`


def penalty_state(seq: Sequence, vocab: int) -> PenaltyState:
    state = seq.penalty_state
    if state is None:
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[torch.tensor(seq.token_ids[:seq.num_prompt_tokens])] = True
        state = seq.penalty_state = PenaltyState(torch.zeros(vocab), seen, seq.num_prompt_tokens)
    new = seq.token_ids[state.num_counted:]
    if new:
        ids = torch.tensor(new)
        state.counts.index_add_(0, ids, torch.ones(len(new)))
        state.seen[ids] = True
        state.num_counted = len(seq.token_ids)
    return state


class ModelRunner:
    """`single_token_threads`: torch threads for steps that compute one token (a lone decode);
    None: always all threads. On 2 cores, with another process keeping a core busy, a 2-thread
    step waits at every barrier for a thread that has no core: the eager step kept 24-26% of its
    quiet speed on two threads and 72-76% on one (interleaved A/B). Quiet, the compiled step is
    faster on two (3.5 vs 4.0 ms for a token's layers), hence `contention`."""

    def __init__(self, model, num_blocks: int, block_size: int, single_token_threads: int | None = None,
                 compiled: CompiledStep | None = None, contention: ContentionMonitor | None = None,
                 kv_dtype: torch.dtype | None = None) -> None:
        """`compiled`: runs steps of few rows (layerserve.model.compiled_step) where it can; the
        eager forward runs the rest, and every step when None. `contention`: when given, a lone
        token runs on `single_token_threads` only while other processes keep a core busy, and on
        all threads otherwise. `kv_dtype`: the KV pool's (default: the model's)."""
        self.model = model
        self.compiled = compiled
        self.single_token_threads = single_token_threads
        self.contention = contention
        self.threads = torch.get_num_threads()
        c = model.config
        self.block_size = block_size
        self.vocab_size = c.vocab_size
        # (L, K/V, slots + 1, n_kv, hd). Not zeroed (that would touch every page at start-up):
        # attention only reads written slots, plus the last slot, a zeroed pad for ragged decode batches.
        self.pad_slot = num_blocks * block_size
        self.kv = torch.empty(c.num_layers, 2, self.pad_slot + 1, c.num_kv_heads, c.head_dim, dtype=kv_dtype or model.dtype)
        self.kv[:, :, self.pad_slot] = 0

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        if self.single_token_threads is not None:
            lone = out.num_batched_tokens <= 1 and (self.contention is None or self.contention.poll())
            want = self.single_token_threads if lone else self.threads
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
        compiled = self.compiled is not None and self.compiled.rows_supported(out.num_batched_tokens)
        input_ids, positions, meta, last_rows = self._prepare(out, compiled)
        if compiled:
            hidden = self.compiled(input_ids, meta, self.kv)
        else:
            hidden = self.model.forward(input_ids, positions, meta, self.kv)
        for src, dst in out.copies:  # after the forward: the parent's last block is now written
            bs = self.block_size
            self.kv[:, :, dst * bs:(dst + 1) * bs] = self.kv[:, :, src * bs:(src + 1) * bs]
        if not out.samples:
            return ModelOutput([], [])
        rows = self._sample_rows(out, last_rows)
        logits = self.model.logits(hidden[torch.tensor([r.row for r in rows])])  # (R, V)
        result = sample(logits, self._sampling_batch(rows, logits.shape[-1]))
        token_ids = result.token_ids.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if result.logprobs is not None:
            chosen = result.logprobs.tolist()
            top_ids, top_lp = result.top_ids.tolist(), result.top_logprobs.tolist()
            for i, r in enumerate(rows):
                k = r.seq.params.logprobs
                if k is not None:
                    logprobs[i] = TokenLogprob(token_ids[i], chosen[i], list(zip(top_ids[i][:k], top_lp[i][:k])))
        # Per sample: the draft is kept up to its first token that differs from what was sampled at
        # that row, and the sampled token there is kept too (every row is sampled as it would have
        # been without the draft, so the output does not depend on drafting).
        tokens: list[list[int]] = []
        lps: list[list[TokenLogprob | None]] = []
        for i, r in enumerate(rows):
            if r.offset == 0:
                tokens.append([token_ids[i]])
                lps.append([logprobs[i]])
            elif r.prior[-1] == tokens[-1][-1] and len(tokens[-1]) == r.offset:  # the row before it was kept
                tokens[-1].append(token_ids[i])
                lps[-1].append(logprobs[i])
        return ModelOutput(tokens, lps)

    def _sample_rows(self, out: SchedulerOutput, last_rows: list[int]) -> list[_SampleRow]:
        """One row per sample, or 1 + k rows for a sample whose item carries a k-token draft."""
        rows: list[_SampleRow] = []
        for seq, row in out.samples:
            item = out.scheduled[row]
            draft = item.draft if item.seq is seq else []
            if not draft:
                mask = seq.logits_mask.allowed_mask() if seq.logits_mask is not None else None
                rows.append(_SampleRow(seq, last_rows[row], 0, [], mask))
                continue
            first = last_rows[row] - len(draft)
            masks = seq.logits_mask.draft_masks(draft) if seq.logits_mask is not None else [None] * (len(draft) + 1)
            rows += [_SampleRow(seq, first + j, j, draft[:j], masks[j]) for j in range(len(draft) + 1)]
        return rows

    def _prepare(self, out: SchedulerOutput, compiled: bool = False):
        """Flatten the step's tokens and build every index tensor attention needs, vectorized: the
        compiled step's StepRows, or the eager step's AttentionMetadata."""
        bs = self.block_size
        ids: list[int] = []
        starts: list[int] = []  # first position computed per sequence
        counts: list[int] = []  # tokens computed per sequence
        for item in out.scheduled:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            ids += seq.token_ids[start:start + n - len(item.draft)] + item.draft
            starts.append(start)
            counts.append(n)
        num_seqs = len(counts)
        widest = max(len(item.seq.block_table) for item in out.scheduled)
        pad_block = self.pad_slot // bs  # never dereferenced for a real position
        tables = torch.tensor([item.seq.block_table + [pad_block] * (widest - len(item.seq.block_table))
                               for item in out.scheduled])  # (S, widest)
        # (S, widest * bs): slot of every context position of every sequence
        ctx_slots = (tables.unsqueeze(-1) * bs + torch.arange(bs)).view(num_seqs, widest * bs)
        counts_t = torch.tensor(counts)
        starts_t = torch.tensor(starts)
        seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), counts_t)  # (T,)
        row_base = torch.repeat_interleave(torch.cumsum(counts_t, 0) - counts_t, counts_t)
        positions = torch.repeat_interleave(starts_t, counts_t) + torch.arange(len(ids)) - row_base
        slot_mapping = ctx_slots[seq_of_row, positions]
        ctx_lens = starts_t + counts_t
        row0 = (torch.cumsum(counts_t, 0) - counts_t).tolist()
        last_rows = [r + n - 1 for r, n in zip(row0, counts)]
        if compiled:
            rows = StepRows(positions, slot_mapping, ctx_slots, seq_of_row, positions + 1)
            return torch.tensor(ids), positions, rows, last_rows
        decode = [i for i, n in enumerate(counts) if n == 1]
        meta = AttentionMetadata(slot_mapping=slot_mapping, decodes=[], prefills=[])
        if decode:
            lens = ctx_lens[decode].tolist()
            groups = group_by_length(lens)
            every_row = len(groups) == 1 and len(decode) == num_seqs  # a lone group needs no scatter
            for members in groups:
                d = torch.tensor([decode[j] for j in sorted(members)])  # in row order
                glens = ctx_lens[d]
                longest = int(glens.max())
                valid = torch.arange(longest).unsqueeze(0) < glens.unsqueeze(1)  # (g, L)
                padded = int(glens.min()) < longest
                meta.decodes.append(DecodeGroup(
                    rows=None if every_row else torch.tensor([row0[i] for i in d.tolist()]),
                    slots=torch.where(valid, ctx_slots[d, :longest], self.pad_slot) if padded else ctx_slots[d, :longest],
                    mask=valid.view(len(d), 1, 1, longest) if padded else None,
                ))
        for i, n in enumerate(counts):
            if n == 1:
                continue
            start, ctx = starts[i], starts[i] + n
            mask = None
            if start > 0:  # query j sits at position start + j and sees positions <= it
                mask = (torch.arange(ctx).unsqueeze(0) <= torch.arange(start, ctx).unsqueeze(1)).view(1, 1, n, ctx)
            meta.prefills.append(PrefillChunk(row0[i], n, ctx_slots[i, :ctx], mask))
        return torch.tensor(ids), positions, meta, last_rows

    def _sampling_batch(self, rows: list[_SampleRow], vocab: int) -> SamplingBatch:
        seqs = [r.seq for r in rows]
        ps = [s.params for s in seqs]
        n = len(rows)
        b = SamplingBatch(
            temperature=torch.tensor([0.0 if p.greedy else p.temperature for p in ps]),
            top_k=torch.tensor([p.top_k if p.top_k > 0 else vocab for p in ps]),
            top_p=torch.tensor([p.top_p for p in ps]),
            min_p=torch.tensor([p.min_p for p in ps]),
            # greedy rows draw no noise: no key to hash for them. A draft row samples the output
            # position it would have been sampled at without the draft.
            keys=torch.tensor([0 if p.greedy else noise_key(r.seq.seed, r.seq.index, r.seq.num_output_tokens + r.offset)
                               for r, p in zip(rows, ps)], dtype=torch.int64),
            all_greedy=all(p.greedy for p in ps),
            needs_filter=any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in ps),
        )
        asked = [p.logprobs for p in ps if p.logprobs is not None]
        b.max_logprobs = max(asked) if asked else None
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in ps):
            states = [_with_prior(penalty_state(r.seq, vocab), r.prior) for r in rows]
            if any(p.presence_penalty or p.frequency_penalty for p in ps):
                b.output_counts = torch.stack([st.counts for st in states])
                b.presence = torch.tensor([p.presence_penalty for p in ps])
                b.frequency = torch.tensor([p.frequency_penalty for p in ps])
            if any(p.repetition_penalty != 1.0 for p in ps):
                b.seen_mask = torch.stack([st.seen for st in states])
                b.repetition = torch.tensor([p.repetition_penalty for p in ps])
        if any(p.logit_bias for p in ps) or any(r.mask is not None for r in rows):
            bias = torch.zeros(n, vocab)
            for i, (p, r) in enumerate(zip(ps, rows)):
                if p.logit_bias:
                    bias[i, torch.tensor(list(p.logit_bias))] = torch.tensor(list(p.logit_bias.values()))
                if r.mask is not None:  # a bool tensor over the tokenizer's vocabulary
                    k = r.mask.shape[0]
                    bias[i, :k].masked_fill_(~r.mask, float("-inf"))
                    bias[i, k:] = float("-inf")
            b.bias = bias
        return b


@dataclass(slots=True)
class _SampleRow:
    """A logits row to sample: a sample's next token, or the token after `prior` (draft tokens)."""

    seq: Sequence
    row: int  # row of the step's hidden states
    offset: int  # output tokens between the sequence's last one and this row's (len(prior))
    prior: list[int]
    mask: torch.Tensor | None  # allowed tokens (grammar), after `prior`


def _with_prior(state: PenaltyState, prior: list[int]) -> PenaltyState:
    """The token counts as they would be after the draft tokens `prior` were output."""
    if not prior:
        return state
    ids = torch.tensor(prior)
    counts = state.counts.clone().index_add_(0, ids, torch.ones(len(prior)))
    seen = state.seen.clone()
    seen[ids] = True
    return PenaltyState(counts, seen, state.num_counted + len(prior))
