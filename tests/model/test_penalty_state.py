"""Penalty counts are updated a step at a time and equal a full recount."""

from __future__ import annotations

import random

import torch

from layerserve.engine.request import SamplingParams
from layerserve.engine.sequence import RequestGroup, Sequence
from layerserve.model.runner import penalty_state

V = 50


def test_incremental_counts_equal_a_full_recount():
    rng = random.Random(0)
    prompt = [rng.randrange(V) for _ in range(30)]
    seq = Sequence(0, RequestGroup("r", prompt, SamplingParams(), 0.0), 0, list(prompt), len(prompt), 1)
    for step in range(200):
        state = penalty_state(seq, V)
        assert state.num_counted == len(seq.token_ids)  # each step only adds what is new
        expected = torch.bincount(torch.tensor(seq.output_ids or [0]), minlength=V).float()
        if not seq.output_ids:
            expected.zero_()
        assert torch.equal(state.counts, expected)
        seen = torch.zeros(V, dtype=torch.bool)
        seen[torch.tensor(seq.token_ids)] = True
        assert torch.equal(state.seen, seen)
        seq.token_ids.append(rng.randrange(V))
