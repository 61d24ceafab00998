"""Our Llama-family forward pass (through the paged KV cache) against Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch

from layerserve.config import SchedulerConfig
from layerserve.engine.kv_cache import KVCacheManager
from layerserve.engine.request import SamplingParams
from layerserve.engine.scheduler import Scheduler
from layerserve.engine.sequence import RequestGroup, Sequence
from layerserve.model.llama import LlamaModel
from layerserve.model.loader import hf_config
from layerserve.model.runner import ModelRunner

import transformers  # noqa: E402  (a dev dependency: a missing one is a failure, not a skip)

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)


def tiny_hf(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama3-scaled":
        cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
        model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # random biases/norms so those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), cfg


def paged_logits(model: LlamaModel, tokens: list[int], chunk: int, block_size: int = 4) -> torch.Tensor:
    """Logits of every position, computed in prefill chunks of `chunk` tokens then decode steps."""
    kv = KVCacheManager(num_blocks=64, block_size=block_size)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=chunk), kv)
    runner = ModelRunner(model, kv.num_blocks, block_size)
    group = RequestGroup("r", tokens[:1], SamplingParams(max_tokens=len(tokens)), 0.0)
    seq = Sequence(0, group, 0, list(tokens), len(tokens), seed=0)
    group.seqs = [seq]
    sched.add(group)
    rows = []
    while seq.num_computed_tokens < len(tokens):
        out = sched.schedule()
        ids, pos, meta, _ = runner._prepare(out)
        with torch.inference_mode():
            rows.append(model.logits(model.forward(ids, pos, meta, runner.kv)))
        seq.num_computed_tokens += out.scheduled[0].num_new_tokens
    return torch.cat(rows)


@pytest.mark.parametrize("kind", ["llama", "llama3-scaled", "qwen2", "qwen3"])
@pytest.mark.parametrize("chunk", [64, 5])
def test_tiny_models_match_transformers(kind, chunk):
    hf, cfg = tiny_hf(kind)
    ours = LlamaModel(hf_config(cfg.to_dict()), dict(hf.state_dict()))
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    got = paged_logits(ours, tokens, chunk)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_decode_steps_match_transformers():
    """Prefill 1 token at a time (every step a decode step through the block table)."""
    hf, cfg = tiny_hf("llama")
    ours = LlamaModel(hf_config(cfg.to_dict()), dict(hf.state_dict()))
    tokens = list(range(3, 30))
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(paged_logits(ours, tokens, chunk=1), ref, atol=2e-4, rtol=1e-4)


def test_default_model_logits_match_transformers(default_weights):
    loaded = default_weights
    c = loaded.config
    hc = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True, max_position_embeddings=512)
    hf = transformers.LlamaForCausalLM(hc).eval()
    hf.load_state_dict(loaded.weights, strict=False)
    hf.tie_weights()
    ours = LlamaModel(c, loaded.weights, max_positions=512)
    tokens = [1, 504, 3458, 282, 4649, 314, 2072, 30, 28, 339, 5248, 253, 1345, 2, 17, 44, 9000, 12, 3, 4]
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    got = paged_logits(ours, tokens, chunk=7, block_size=16)
    torch.testing.assert_close(got, ref, atol=5e-4, rtol=1e-4)


def test_mixed_length_batch_matches_transformers():
    """Decodes of very different context lengths (several padded length groups) next to a prefill.

    Each sequence's logits must equal transformers' on that sequence alone: grouping, padding and
    the scatter of rows back into step order must not mix sequences up.
    """
    hf, cfg = tiny_hf("llama")
    ours = LlamaModel(hf_config(cfg.to_dict()), dict(hf.state_dict()))
    gen = torch.Generator().manual_seed(2)
    lengths = [4, 11, 62, 133, 205, 240]  # the last one arrives while the others decode
    seqs_tokens = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    with torch.no_grad():
        refs = [hf(torch.tensor([t])).logits[0] for t in seqs_tokens]
    kv = KVCacheManager(num_blocks=256, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=2048), kv)
    runner = ModelRunner(ours, kv.num_blocks, 4)
    seqs = []

    def add(i: int, n_known: int) -> None:
        group = RequestGroup(f"r{i}", seqs_tokens[i][:n_known], SamplingParams(max_tokens=300), 0.0)
        seq = Sequence(i, group, 0, list(seqs_tokens[i][:n_known]), n_known, seed=0)
        group.seqs = [seq]
        sched.add(group)
        seqs.append(seq)

    def step() -> dict[int, torch.Tensor]:
        out = sched.schedule()
        ids, pos, meta, last_rows = runner._prepare(out)
        with torch.inference_mode():
            logits = ours.logits(ours.forward(ids, pos, meta, runner.kv))
        got = {}
        for row, item in enumerate(out.scheduled):
            item.seq.num_computed_tokens += item.num_new_tokens
            got[item.seq.seq_id] = logits[last_rows[row]]
        return got

    for i in range(5):
        add(i, lengths[i] - 3)
    step()  # prefill all but the last 3 tokens of each
    for k in (3, 2, 1):
        for s in seqs[:5]:
            s.token_ids.append(seqs_tokens[s.seq_id][-k])
        if k == 2:
            add(5, lengths[5])  # a whole prompt in the same step as five decodes
        got = step()
        for s in seqs[:5]:
            torch.testing.assert_close(got[s.seq_id], refs[s.seq_id][-k], atol=2e-4, rtol=1e-4)
        if k == 2:
            torch.testing.assert_close(got[5], refs[5][-1], atol=2e-4, rtol=1e-4)


def test_group_by_length_bounds_padding():
    from layerserve.model.attention import group_by_length

    lengths = [1500, 90, 1400, 100, 30, 700, 1450, 64]
    groups = group_by_length(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each sequence once
    assert [sorted(g) for g in groups] == [[0, 2, 6], [5], [1, 3, 4, 7]]
    assert group_by_length([5, 5, 5]) == [[0, 1, 2]]
    assert group_by_length([]) == []
