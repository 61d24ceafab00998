"""The vectorized sampler on hand-made logits: distribution, filters, penalties, determinism."""

from __future__ import annotations

import torch

from layerserve.model.sampler import SamplingBatch, hash_uniform, noise_key, sample

V = 8


def keys(seeds, index=0, step=0) -> torch.Tensor:
    return torch.tensor([noise_key(s, index, step) for s in seeds], dtype=torch.int64)


def batch(n: int, temperature=1.0, top_k=V, top_p=1.0, min_p=0.0, seed0=0, vocab=V, **kw) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((n,), float(temperature)), top_k=torch.full((n,), top_k), top_p=torch.full((n,), top_p),
        min_p=torch.full((n,), min_p), keys=keys(range(seed0, seed0 + n)),
        all_greedy=temperature == 0, needs_filter=top_k < vocab or top_p < 1 or min_p > 0, **kw)


PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0])
LOGITS = torch.log(PROBS.clamp(min=1e-12))


def frequencies(b: SamplingBatch, n: int) -> torch.Tensor:
    ids = sample(LOGITS.expand(n, V).contiguous(), b).token_ids
    return torch.bincount(ids, minlength=V).float() / n


def test_samples_follow_the_distribution():
    n = 20000
    freq = frequencies(batch(n), n)
    assert torch.allclose(freq, PROBS, atol=0.015)


def test_hash_uniform_is_uniform_and_seed_dependent():
    u = hash_uniform(keys([1, 2]), 50000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1])
    assert torch.equal(u, hash_uniform(keys([1, 2]), 50000))


def test_uniforms_are_strictly_inside_the_unit_interval():
    # 512 rows x 49152 tokens = 25M draws (0.0 can never be allowed either: -log would be inf).
    for chunk in range(2):
        u = hash_uniform(keys(range(chunk * 256, (chunk + 1) * 256), step=7), 49152)
        assert u.min().item() > 0.0 and u.max().item() < 1.0
        assert torch.isfinite(-torch.log(u)).all() and (-torch.log(u) > 0).all()


def test_a_zeroed_token_is_never_sampled():
    """top_k=1 at temperature 1 is greedy, on a real vocabulary size, over many (seed, step) rows:
    the old noise reached exactly 1.0 about once in 340 rows, so 0/0 = NaN made argmax pick token 0."""
    vocab, rows = 49152, 256
    gen = torch.Generator().manual_seed(0)
    wrong = 0
    for step in range(8):
        logits = torch.randn(rows, vocab, generator=gen)
        logits[:, 0] = -5.0  # the first token (argmax's pick among NaNs) is never the best
        b = batch(rows, top_k=1, vocab=vocab)
        b.keys = keys(range(rows), step=step)
        wrong += (sample(logits, b).token_ids != logits.argmax(dim=-1)).sum().item()
        b = batch(rows, top_p=1e-6, vocab=vocab)  # top-p that keeps only the best token
        b.keys = keys(range(rows), step=100 + step)
        wrong += (sample(logits, b).token_ids != logits.argmax(dim=-1)).sum().item()
    assert wrong == 0


def test_masked_tokens_never_win_even_when_every_allowed_probability_underflows():
    logits = torch.tensor([[0.0, -200.0, 10.0, -300.0]])
    b = batch(1, vocab=4)
    b.bias = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0]])  # only 1 and 3 allowed
    for seed in range(200):
        b.keys = keys([seed])
        assert sample(logits, b).token_ids.item() in (1, 3)


def test_noise_keys_use_all_64_bits_and_separate_choices():
    s = 123456789
    base = hash_uniform(keys([s], index=1), 1000)[0]
    assert not torch.equal(base, hash_uniform(keys([s + 1], index=0), 1000)[0])  # choice i of s != choice 0 of s+i
    assert not torch.equal(hash_uniform(keys([s]), 1000), hash_uniform(keys([s + (1 << 32)]), 1000))  # high bits count
    assert not torch.equal(hash_uniform(keys([s]), 1000), hash_uniform(keys([s - (1 << 63)]), 1000))  # top bit counts
    assert noise_key(-1, 0, 0) == noise_key((1 << 64) - 1, 0, 0)  # an int64 seed and its unsigned twin agree
    seen = {noise_key(seed, index, step) for seed in range(40) for index in range(8) for step in range(8)}
    assert len(seen) == 40 * 8 * 8


def test_top_k_top_p_min_p_restrict_support():
    n = 4000
    assert frequencies(batch(n, top_k=2), n)[2:].sum() == 0
    assert frequencies(batch(n, top_p=0.6), n)[2:].sum() == 0  # 0.4 + 0.3 crosses 0.6
    assert frequencies(batch(n, min_p=0.5), n)[2:].sum() == 0  # keeps p >= 0.2
    assert frequencies(batch(n, top_k=1), n)[0] == 1


def test_low_temperature_sharpens_and_greedy_is_argmax():
    n = 4000
    assert frequencies(batch(n, temperature=0.1), n)[0] > 0.9
    assert (sample(LOGITS.expand(3, V).contiguous(), batch(3, temperature=0)).token_ids == 0).all()


def test_mixed_greedy_and_random_rows_are_independent():
    logits = LOGITS.expand(4, V).contiguous()
    b = batch(4)
    b.temperature[1] = 0
    alone = sample(logits[2:3], batch(1, seed0=2)).token_ids
    out = sample(logits, b).token_ids
    assert out[1] == 0 and out[2] == alone[0]


def test_penalties_and_bias():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    b = SamplingBatch(temperature=torch.zeros(1), top_k=torch.tensor([4]), top_p=torch.ones(1), min_p=torch.zeros(1),
                      keys=torch.zeros(1, dtype=torch.int64), all_greedy=True, needs_filter=False)
    b.output_counts = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    b.presence, b.frequency = torch.tensor([0.5]), torch.tensor([0.6])  # 2 - 0.5 - 1.2 = 0.3 < 1
    assert sample(logits, b).token_ids.item() == 1
    b.output_counts = None
    b.bias = torch.tensor([[0.0, 0.0, 5.0, float("-inf")]])
    assert sample(logits, b).token_ids.item() == 2
    b.bias = None
    b.seen_mask, b.repetition = torch.tensor([[True, False, False, False]]), torch.tensor([3.0])  # 2/3 < 1
    assert sample(logits, b).token_ids.item() == 1


def test_logprobs_are_of_the_raw_distribution():
    b = batch(1, temperature=0)
    b.max_logprobs = 3
    out = sample(LOGITS.unsqueeze(0), b)
    assert torch.allclose(out.logprobs.exp(), torch.tensor([0.4]), atol=1e-5)
    assert out.top_ids[0].tolist() == [0, 1, 2]
