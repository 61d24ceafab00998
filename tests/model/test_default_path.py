"""The fast default path (kernels chosen by measurement, quantized weights) against the float32
reference on the same GGUF, teacher-forced over human-written text kept in the repo."""

from __future__ import annotations

import pathlib

import torch

from layerserve.config import EngineConfig, SchedulerConfig
from layerserve.engine.builder import kernel_plan
from layerserve.engine.kv_cache import KVCacheManager
from layerserve.engine.request import SamplingParams
from layerserve.engine.scheduler import Scheduler
from layerserve.engine.sequence import RequestGroup, Sequence
from layerserve.model.compiled_step import CompiledStep
from layerserve.model.llama import LlamaModel
from layerserve.model.runner import ModelRunner

TEXT = pathlib.Path(__file__).parent.parent / "fixtures" / "GPL-3.txt"
NUM_TOKENS = 2000
# Row counts per step cycle through decode-sized and prefill-sized batches, so every rung of each
# layer's kernel ladder (1 row ... 64 rows) is exercised, as a server mixes them.
CHUNKS = (1, 2, 3, 4, 8, 16, 64)


def top1_teacher_forced(model: LlamaModel, tokens: list[int], block_size: int = 16,
                        step: CompiledStep | None = None, kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """argmax of the next-token logits at every position, computed in steps of CHUNKS rows, by the
    eager forward or, given `step`, by the compiled step."""
    kv = KVCacheManager(num_blocks=len(tokens) // block_size + 2, block_size=block_size)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=max(CHUNKS)), kv)
    runner = ModelRunner(model, kv.num_blocks, block_size, kv_dtype=kv_dtype)
    group = RequestGroup("r", tokens[:1], SamplingParams(max_tokens=len(tokens)), 0.0)
    seq = Sequence(0, group, 0, list(tokens), len(tokens), seed=0)
    group.seqs = [seq]
    sched.add(group)
    top1, i = [], 0
    while seq.num_computed_tokens < len(tokens):
        sched.config = SchedulerConfig(max_num_batched_tokens=CHUNKS[i % len(CHUNKS)])
        out = sched.schedule()
        compiled = step is not None and step.rows_supported(out.num_batched_tokens)
        ids, pos, meta, _ = runner._prepare(out, compiled)
        with torch.inference_mode():
            hidden = step(ids, meta, runner.kv) if compiled else model.forward(ids, pos, meta, runner.kv)
            top1.append(model.logits(hidden).argmax(dim=-1))
        seq.num_computed_tokens += out.scheduled[0].num_new_tokens
        i += 1
    return torch.cat(top1)


def test_default_path_agrees_with_float32_teacher_forced(default_weights, smollm_tokenizer):
    tokens = smollm_tokenizer.encode(TEXT.read_text(encoding="utf-8"))[:NUM_TOKENS]
    assert len(tokens) == NUM_TOKENS
    mc = default_weights.config
    reference = LlamaModel(mc, default_weights.weights)
    config = EngineConfig(model="default", dtype="auto", scheduler=SchedulerConfig(max_num_seqs=64))
    plan = kernel_plan(config, mc, quantized=True)
    fast = LlamaModel(mc, default_weights.weights, plan=plan)
    ref_top1 = top1_teacher_forced(reference, tokens)
    fast_top1 = top1_teacher_forced(fast, tokens, kv_dtype=torch.float16)  # the served KV pool
    agreement = (ref_top1 == fast_top1).float().mean().item()
    kernels = sorted({name for ladder in plan.choices.values() for _, name in ladder})
    print(f"default path (eager) top-1 agreement with float32 over {NUM_TOKENS} teacher-forced tokens: "
          f"{agreement:.2%} (kernels in the plan: {', '.join(kernels)})")
    assert agreement >= 0.98
    step = CompiledStep(fast)
    if step.available:  # the default server runs steps of up to 64 rows compiled
        compiled_top1 = top1_teacher_forced(fast, tokens, step=step, kv_dtype=torch.float16)
        compiled = (ref_top1 == compiled_top1).float().mean().item()
        same = (fast_top1 == compiled_top1).float().mean().item()
        print(f"compiled step: {compiled:.2%} agreement with float32, {same:.2%} with the eager fast path")
        assert compiled >= 0.98
