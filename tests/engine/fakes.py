"""A fake model runner for engine tests that need the real EngineCore but no forward pass.

The runner's contract (SchedulerOutput in, one token per sample out) is all EngineCore sees, so
scheduling, prefix caching, usage and fault handling are tested here without tensors.
"""

from __future__ import annotations

from collections.abc import Callable

from layerserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from layerserve.engine.core import EngineCore
from layerserve.engine.scheduler import SchedulerOutput
from layerserve.model.runner import ModelOutput

FILLER = 1000  # the token a FakeRunner emits (a plain word piece in the default vocabulary)


class FakeRunner:
    """Emits FILLER for every sample; `hook` (if set) sees each SchedulerOutput first (and may raise)."""

    def __init__(self, vocab_size: int, hook: Callable[[SchedulerOutput], None] | None = None) -> None:
        self.vocab_size = vocab_size
        self.hook = hook
        self.steps: list[SchedulerOutput] = []

    def execute(self, out: SchedulerOutput) -> ModelOutput:
        if self.hook is not None:
            self.hook(out)
        self.steps.append(out)
        return ModelOutput([[FILLER] for _ in out.samples], [[None] for _ in out.samples])


def make_core(tokenizer, *, num_blocks: int, block_size: int = 4, max_num_seqs: int = 64,
              max_num_batched_tokens: int = 512, max_model_len: int = 1024,
              hook: Callable[[SchedulerOutput], None] | None = None, runner=None,
              speculative: SpeculativeConfig | None = None) -> EngineCore:
    """The real EngineCore over `runner` (default: a FakeRunner with `hook`); no drafting unless
    `speculative` says so."""
    config = EngineConfig(model="fake", speculative=speculative, cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                                    max_num_batched_tokens=max_num_batched_tokens,
                                                    max_model_len=max_model_len))
    return EngineCore(config, runner or FakeRunner(tokenizer.vocab_size, hook), tokenizer, num_blocks)


def run_until_idle(core: EngineCore, max_steps: int = 10_000) -> list:
    outputs = []
    for _ in range(max_steps):
        if not core.has_work():
            return outputs
        outputs += core.step()
    raise AssertionError("the engine did not finish its work")
