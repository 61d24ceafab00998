"""Build an EngineCore from an EngineConfig: load weights and tokenizer, size the KV pool."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from layerserve.config import EngineConfig, ModelConfig
from layerserve.engine.core import EngineCore
from layerserve.model_files import resolve_model_path
from layerserve.model.linear import int4_available
from layerserve.model.loader import load_model_files
from layerserve.model import llama as _llama  # noqa: F401  (registers the Llama family)
from layerserve.model.registry import MODELS
from layerserve.model.runner import ModelRunner, kv_bytes_per_token

log = logging.getLogger("layerserve.engine")

# name -> (activation/KV dtype, int4 weights for decode)
_DTYPES = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False),
           "float16": (torch.float16, False), "q4": (torch.bfloat16, True)}


@dataclass(slots=True)
class EngineInfo:
    """What a caller needs to know about the loaded engine."""

    model_path: str
    model_config: ModelConfig
    dtype: str
    num_blocks: int
    block_size: int
    kv_cache_bytes: int
    max_model_len: int
    load_seconds: float


def load_tokenizer(path: Path):
    from layerserve.text.tokenizer import Tokenizer

    return Tokenizer.from_dir(path) if path.is_dir() else Tokenizer.from_gguf(path)


def build_engine(config: EngineConfig, progress: bool = True) -> tuple[EngineCore, EngineInfo]:
    started = time.monotonic()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if config.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {config.dtype!r} (choose from {', '.join(_DTYPES)})")
    dtype, int4 = _DTYPES[config.dtype]
    if int4 and not int4_available():
        log.warning("this torch build has no CPU int4 kernel; using bfloat16 weights")
        int4 = False
    path = resolve_model_path(config.model)
    loaded = load_model_files(path, dtype=dtype, progress=progress)
    tokenizer = load_tokenizer(path)
    mc = loaded.config
    max_model_len = min(config.scheduler.max_model_len, mc.max_position_embeddings)
    model_cls = MODELS.resolve(mc.architecture)
    model = model_cls(mc, loaded.weights, loaded.rope_freq_factors, max_positions=max_model_len, int4=int4)
    cache = config.cache
    per_block = kv_bytes_per_token(model) * cache.block_size
    num_blocks = cache.num_blocks or max(1, cache.kv_cache_memory // per_block)
    pool_tokens = num_blocks * cache.block_size
    if pool_tokens < max_model_len:
        log.warning("KV pool holds %d tokens; limiting max_model_len from %d", pool_tokens, max_model_len)
        max_model_len = pool_tokens
    sched = dataclasses.replace(config.scheduler, max_model_len=max_model_len)
    config = dataclasses.replace(config, scheduler=sched)
    runner = ModelRunner(model, num_blocks, cache.block_size)
    core = EngineCore(config, runner, tokenizer, num_blocks)
    info = EngineInfo(str(path), mc, config.dtype, num_blocks, cache.block_size, num_blocks * per_block,
                      max_model_len, time.monotonic() - started)
    return core, info
