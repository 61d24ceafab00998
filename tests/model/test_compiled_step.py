"""The compiled C++ step (layerserve/model/compiled_step.py) against the eager forward, its reference.

With dense float32 weights both compute the same arithmetic up to float32 rounding order, so they
must agree to ~1e-5. With our int4 kernels they share the kernel bit for bit, but a last-bit change
upstream can move an int8 activation to the next grid point, so those are held to a loose bound
plus greedy agreement. Small random models cover what the default model lacks: q/k/v bias (Qwen2),
per-head q/k RMSNorm (Qwen3), GQA ratios and head sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from layerserve.config import ModelConfig
from layerserve.model.attention import AttentionMetadata, DecodeGroup, PrefillChunk
from layerserve.model.compiled_step import CompiledStep, StepRows
from layerserve.model.kernel_choice import KernelPlan
from layerserve.model.llama import LlamaModel, linear_shapes

TINY = ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)


def random_weights(c: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    w = {"model.embed_tokens.weight": r(c.vocab_size, c.hidden_size, scale=1.0),
         "model.norm.weight": 1 + r(c.hidden_size), "lm_head.weight": r(c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + r(c.hidden_size), p + "post_attention_layernorm.weight": 1 + r(c.hidden_size),
              p + "self_attn.q_proj.weight": r(q, c.hidden_size), p + "self_attn.k_proj.weight": r(kv, c.hidden_size),
              p + "self_attn.v_proj.weight": r(kv, c.hidden_size), p + "self_attn.o_proj.weight": r(c.hidden_size, q),
              p + "mlp.gate_proj.weight": r(c.intermediate_size, c.hidden_size),
              p + "mlp.up_proj.weight": r(c.intermediate_size, c.hidden_size),
              p + "mlp.down_proj.weight": r(c.hidden_size, c.intermediate_size)}
        if c.attention_bias:
            w |= {p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(kv), p + "self_attn.v_proj.bias": r(kv)}
        if c.qk_norm:
            w |= {p + "self_attn.q_norm.weight": 1 + r(c.head_dim), p + "self_attn.k_norm.weight": 1 + r(c.head_dim)}
    return w


def kv_pool(c: ModelConfig, slots: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(c.num_layers, 2, slots, c.num_kv_heads, c.head_dim, dtype=dtype)


def eager_prefill(model: LlamaModel, ids: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    n = ids.shape[0]
    meta = AttentionMetadata(slot_mapping=slots, decodes=[], prefills=[PrefillChunk(0, n, slots, None)])
    return model.forward(ids, torch.arange(n), meta, kv)


def one_sequence(slots: torch.Tensor, start: int) -> StepRows:
    """Rows start.. of one sequence whose context is `slots`: row j sees positions <= start + j."""
    n = slots.shape[0] - start
    pos = torch.arange(start, start + n)
    return StepRows(pos, slots[start:], slots.view(1, -1).contiguous(), torch.zeros(n, dtype=torch.long), pos + 1)


CONFIGS = {
    "llama-gqa": TINY,
    "qwen2-bias": dataclasses.replace(TINY, architecture="qwen2", attention_bias=True),
    "qwen3-qk-norm": dataclasses.replace(TINY, architecture="qwen3", qk_norm=True, num_kv_heads=1, head_dim=32),
    "mha-odd-head": dataclasses.replace(TINY, num_heads=3, num_kv_heads=3, head_dim=10, hidden_size=30),
}


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["kv32", "kv16"])
@pytest.mark.parametrize("name", CONFIGS)
@torch.inference_mode()
def test_compiled_step_matches_eager_on_dense_float32(name, kv_dtype):
    c = CONFIGS[name]
    model = LlamaModel(c, random_weights(c))
    step = CompiledStep(model)
    assert step.available, step.reason
    ids = torch.randint(0, c.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    slots = torch.randperm(40, generator=torch.Generator().manual_seed(2))[:20]  # scattered, as paged blocks are
    kv_eager, kv_compiled = kv_pool(c, 41, kv_dtype), kv_pool(c, 41, kv_dtype)
    want = eager_prefill(model, ids, slots, kv_eager)
    # the same 20 rows as one compiled call: row j attends to rows 0..j (causal, through row_len)
    got = step(ids, one_sequence(slots, 0), kv_compiled)
    # fp16 K/V: a last-bit difference upstream can move a stored value to the next fp16 step (2^-11)
    tol = 1e-5 if kv_dtype == torch.float32 else 5e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    kv_tol = 1e-5 if kv_dtype == torch.float32 else 2.0 ** -10  # one fp16 step (relative)
    torch.testing.assert_close(kv_compiled.float(), kv_eager.float(), rtol=kv_tol, atol=tol)


@torch.inference_mode()
def test_compiled_decode_batch_of_ragged_sequences_matches_eager():
    """Three sequences of different lengths decode one token each in one call (fp16 KV)."""
    c = CONFIGS["qwen3-qk-norm"]
    model = LlamaModel(c, random_weights(c, seed=3))
    step = CompiledStep(model)
    gen = torch.Generator().manual_seed(4)
    lengths = [5, 17, 9]
    perm = torch.randperm(64, generator=gen)
    ctx, at = [], 0
    kv_eager, kv_compiled = kv_pool(c, 65, torch.float16), kv_pool(c, 65, torch.float16)  # the served pool's dtype
    for n in lengths:  # fill each sequence's context with the eager prefill, in both pools
        slots = perm[at:at + n + 1]
        at += n + 1
        ctx.append(slots)
        ids = torch.randint(0, c.vocab_size, (n,), generator=gen)
        eager_prefill(model, ids, slots[:n], kv_eager)
        eager_prefill(model, ids, slots[:n], kv_compiled)
    new_ids = torch.randint(0, c.vocab_size, (3,), generator=gen)
    pos = torch.tensor(lengths)
    slot_mapping = torch.stack([s[-1] for s in ctx])
    width = max(lengths) + 1
    table = torch.stack([torch.cat([s, s.new_full((width - len(s),), 64)]) for s in ctx])  # padded with the pad slot
    want = torch.empty(3, c.hidden_size)
    for i in range(3):  # eager: one decode group per sequence
        group = DecodeGroup(rows=None, slots=ctx[i].view(1, -1), mask=None)
        meta = AttentionMetadata(slot_mapping=slot_mapping[i:i + 1], decodes=[group], prefills=[])
        want[i] = model.forward(new_ids[i:i + 1], pos[i:i + 1], meta, kv_eager)[0]
    rows = StepRows(pos, slot_mapping, table, torch.arange(3), pos + 1)
    got = step(new_ids, rows, kv_compiled)
    torch.testing.assert_close(got, want, rtol=5e-4, atol=5e-4)
    torch.testing.assert_close(kv_compiled.float(), kv_eager.float(), rtol=2.0 ** -10, atol=5e-4)


@torch.inference_mode()
def test_rows_of_one_sequence_in_one_call_equal_one_call_per_row():
    """What a speculative verification relies on: k rows at once compute what k decodes would."""
    c = TINY
    model = LlamaModel(c, random_weights(c, seed=5))
    step = CompiledStep(model)
    ids = torch.randint(0, c.vocab_size, (12,), generator=torch.Generator().manual_seed(6))
    slots = torch.arange(12)
    kv_a, kv_b = kv_pool(c, 13), kv_pool(c, 13)
    step(ids[:7], one_sequence(slots[:7], 0), kv_a)
    step(ids[:7], one_sequence(slots[:7], 0), kv_b)
    together = step(ids[7:], one_sequence(slots, 7), kv_a)
    apart = torch.cat([step(ids[j:j + 1], one_sequence(slots[:j + 1], j), kv_b) for j in range(7, 12)])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_compiled_step_on_our_int4_kernels_tracks_eager():
    c = dataclasses.replace(TINY, hidden_size=64, intermediate_size=96, head_dim=16)
    weights = random_weights(c, seed=7)
    plan = KernelPlan({f"{n}x{k}": [(64, "q4")] for n, k, _ in linear_shapes(c, 64, 64)})
    model = LlamaModel(c, weights, plan=plan)
    step = CompiledStep(model)
    if not step.available:
        pytest.skip(step.reason)
    assert step.rows_supported(1) and step.rows_supported(64) and not step.rows_supported(65)
    ids = torch.randint(0, c.vocab_size, (16,), generator=torch.Generator().manual_seed(8))
    slots = torch.arange(16)
    kv_eager, kv_compiled = kv_pool(c, 17), kv_pool(c, 17)
    want = eager_prefill(model, ids, slots, kv_eager)
    got = step(ids, one_sequence(slots, 0), kv_compiled)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-2 * scale
    assert (model.logits(got).argmax(-1) == model.logits(want).argmax(-1)).float().mean() >= 0.9


def test_torch_int4_kernel_rows_fall_back_to_eager():
    """Rows whose kernel is one of torch's int4/int8 ones are not the compiled step's to run."""
    c = TINY
    plan = KernelPlan({f"{n}x{k}": [(4, "f32"), (64, "int8")] for n, k, _ in linear_shapes(c, 64, 64)})
    step = CompiledStep(LlamaModel(c, random_weights(c), plan=plan))
    assert step.rows_supported(4)
    assert not step.rows_supported(5)


def test_bf16_models_have_no_compiled_step():
    c = TINY
    weights = {k: v.to(torch.bfloat16) for k, v in random_weights(c).items()}
    step = CompiledStep(LlamaModel(c, weights))
    assert not step.available and "float32" in step.reason
    assert not step.rows_supported(1)


@torch.inference_mode()
def test_out_of_range_indexes_raise_instead_of_reading_memory():
    c = TINY
    step = CompiledStep(LlamaModel(c, random_weights(c)))
    kv = kv_pool(c, 8)
    ids = torch.tensor([1])
    good = StepRows(torch.tensor([0]), torch.tensor([0]), torch.tensor([[0]]), torch.tensor([0]), torch.tensor([1]))
    step(ids, good, kv)
    bad = [
        dataclasses.replace(good, slot_mapping=torch.tensor([8])),
        dataclasses.replace(good, ctx_slots=torch.tensor([[99]])),
        dataclasses.replace(good, row_len=torch.tensor([2])),
        dataclasses.replace(good, row_seq=torch.tensor([1])),
        dataclasses.replace(good, positions=torch.tensor([c.max_position_embeddings])),
    ]
    for rows in bad:
        with pytest.raises(RuntimeError, match="decode_step"):
            step(ids, rows, kv)


@torch.inference_mode()
def test_every_cpu_path_computes_the_same_step():
    """AVX512 hosts, AVX2-only hosts and the plain C++ path compute the same step: the int4 matmuls
    agree bit for bit on the same input, attention's summation order differs (8-wide vs scalar), and
    that last-bit difference may move an int8 activation or an fp16 K/V value to the next step."""
    c = dataclasses.replace(TINY, hidden_size=64, intermediate_size=96, head_dim=16)
    plan = KernelPlan({f"{n}x{k}": [(64, "q4")] for n, k, _ in linear_shapes(c, 64, 64)})
    step = CompiledStep(LlamaModel(c, random_weights(c, seed=9), plan=plan))
    if not step.available:
        pytest.skip(step.reason)
    ids = torch.randint(0, c.vocab_size, (12,), generator=torch.Generator().manual_seed(10))
    slots = torch.arange(12)
    outs = {}
    for code in torch.ops.layerserve_q4.paths():
        step._path = code
        outs[code] = step(ids, one_sequence(slots, 0), kv_pool(c, 13, torch.float16))
    assert len(outs) >= 2  # the plain path runs everywhere, a vector one on every x86-64 we serve
    first = next(iter(outs.values()))
    for out in outs.values():
        assert (out - first).abs().max() <= 1e-2 * first.abs().max()
