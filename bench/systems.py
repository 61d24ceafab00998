"""The systems under test, one class each, all with `run(prompts, max_tokens) -> list[Timing]`:
every prompt is submitted at once, decoded greedily for exactly `max_tokens` tokens (EOS ignored).

- OursOffline: layerserve's EngineCore, stepped in this process (no HTTP).
- HFGenerate: transformers `generate`; several prompts become one left-padded batch.
- LlamaServerHTTP: llama.cpp's llama-server over localhost HTTP, one thread per request.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.common import Timing


class OursOffline:
    name = "layerserve"

    def __init__(self, dtype: str = "float32") -> None:
        from layerserve.engine.llm import LLM

        self.llm = LLM(dtype=dtype, progress=False)
        self.core = self.llm.core
        self._ids = itertools.count()

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text, add_special_tokens=False)

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[Timing]:
        from layerserve.engine.request import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        timings: dict[str, Timing] = {}
        for ids in prompts:
            rid = f"bench-{next(self._ids)}"
            self.core.add_request(rid, ids, params)
            timings[rid] = Timing(t0, None, 0.0, len(ids), 0)
        while self.core.has_work():
            outputs = self.core.step()
            now = time.perf_counter()
            for out in outputs:
                t = timings.get(out.request_id)
                if t is None:
                    continue
                n = sum(len(d.token_ids) for d in out.deltas)
                if n and t.first_token is None:
                    t.first_token = now
                t.new_tokens += n
                if out.finished:
                    t.done = now
        return list(timings.values())


class _StepClock:
    """A transformers streamer that only notes when each step's tokens arrive. generate() puts the
    prompt first, then the tokens of every step (any batch size)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFGenerate:
    name = "HF transformers"

    def __init__(self, model_path: str, pad_token_id: int) -> None:
        import transformers

        from layerserve.model.loader import load_model_files

        loaded = load_model_files(model_path, progress=False)
        c = loaded.config
        hc = transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
            tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings)
        self.model = transformers.LlamaForCausalLM(hc).eval()
        self.model.load_state_dict(loaded.weights, strict=False)
        self.model.tie_weights()
        self.pad_token_id = pad_token_id
        self.attn_implementation = self.model.config._attn_implementation

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[Timing]:
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last prompt token lines up
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        clock = _StepClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=self.pad_token_id, streamer=clock)
        done = time.perf_counter()
        new = out.shape[1] - longest
        first = clock.times[1] if len(clock.times) > 1 else None
        return [Timing(t0, first, done, len(p), new) for p in prompts]


class LlamaServerHTTP:
    name = "llama-server"

    def __init__(self, server) -> None:
        self.server = server  # bench.peers.LlamaServer

    def _body(self, prompt: list[int], max_tokens: int, stream: bool) -> dict:
        return {"prompt": prompt, "n_predict": max_tokens, "ignore_eos": True, "temperature": 0.0,
                "cache_prompt": False, "stream": stream}

    def _streamed(self, prompt: list[int], max_tokens: int) -> Timing:
        body = json.dumps(self._body(prompt, max_tokens, stream=True)).encode()
        req = urllib.request.Request(self.server.url + "/completion", body, {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        first = None
        final: dict = {}
        with urllib.request.urlopen(req, timeout=600) as resp:
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if first is None and not event.get("stop"):
                    first = time.perf_counter()
                if event.get("stop"):
                    final = event
        done = time.perf_counter()
        return Timing(t0, first or done, done, len(prompt), _num_predicted(final, max_tokens))

    def _whole(self, prompt: list[int], max_tokens: int) -> Timing:
        t0 = time.perf_counter()
        result = self.server.post("/completion", self._body(prompt, max_tokens, stream=False))
        return Timing(t0, None, time.perf_counter(), len(prompt), _num_predicted(result, max_tokens))

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[Timing]:
        if len(prompts) == 1:  # streamed, to see the first token; many streams would tax the client's CPU
            return [self._streamed(prompts[0], max_tokens)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(lambda p: self._whole(p, max_tokens), prompts))


def _num_predicted(result: dict, asked: int) -> int:
    n = result.get("tokens_predicted", result.get("timings", {}).get("predicted_n"))
    if n is None:
        raise RuntimeError(f"llama-server reply without a token count: {sorted(result)}")
    if n != asked:
        raise RuntimeError(f"llama-server produced {n} tokens, asked for {asked} (ignore_eos not honoured?)")
    return n
