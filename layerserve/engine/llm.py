"""Offline batch generation for scripts: `LLM().generate(prompts, params)`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from layerserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from layerserve.engine.builder import build_engine
from layerserve.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob


@dataclass(slots=True)
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    cached_tokens: int = 0


class LLM:
    """Runs the engine synchronously in the caller's thread. Prompts are strings (tokenized
    as-is), token-id lists, or chat message lists (rendered with the model's template).

    As `layerserve serve`'s flags: `compile=False` is --no-compile (eager steps only), and
    `draft_tokens` is --draft-tokens (0: no speculative decoding)."""

    def __init__(self, model: str | None = None, *, dtype: str = "auto", compile: bool = True, draft_tokens: int = 3,
                 kv_cache_memory: int = 1 << 30, max_model_len: int = 8192, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, num_blocks: int | None = None, progress: bool = True) -> None:
        config = EngineConfig(
            model=model or "default",
            dtype=dtype,
            compile=compile,
            speculative=SpeculativeConfig(num_draft_tokens=draft_tokens) if draft_tokens > 0 else None,
            cache=CacheConfig(kv_cache_memory=kv_cache_memory, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len),
        )
        self.core, self.info = build_engine(config, progress=progress)
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        from layerserve.text.chat_template import ChatTemplate

        tok = self.tokenizer
        template = ChatTemplate(tok.chat_template, tok.bos_token, tok.eos_token)
        literals = tok.literals()  # special-token strings inside messages stay text, as in the server
        text = template.render_request(messages, None, True, template_kwargs, literals.hide)
        return tok.encode_prompt(text, literals)

    def generate(self, prompts, params: SamplingParams | None = None) -> list[GenerationResult]:
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]  # one prompt: text, token ids or a conversation
        results: dict[str, GenerationResult] = {}
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt, add_special_tokens=self.tokenizer.add_bos_token)
            elif prompt and isinstance(prompt[0], dict):
                ids = self.encode_chat(prompt)
            else:
                ids = list(prompt)
            rid = f"offline-{next(self._ids)}"
            self.core.add_request(rid, ids, params)
            results[rid] = GenerationResult(rid, ids, [Completion(i) for i in range(params.n)])
        while self.core.has_work():
            for out in self.core.step():
                if out.request_id in results:  # requests added to the core directly are not ours
                    self._collect(results[out.request_id], out)
        return list(results.values())

    @staticmethod
    def _collect(result: GenerationResult, out: RequestOutput) -> None:
        result.cached_tokens = out.cached_tokens
        for d in out.deltas:
            c = result.outputs[d.index]
            c.text += d.text
            c.token_ids += d.token_ids
            if d.logprobs:
                c.logprobs += d.logprobs
            if d.finish_reason is not None:
                c.finish_reason = d.finish_reason
