"""What every benchmarked system shares: per-request timings, prompts, the memory-bandwidth bound."""

from __future__ import annotations

import itertools
import statistics
import subprocess
import time
from dataclasses import dataclass

import torch

from layerserve.model.cpu_load import CpuWatch  # noqa: F401  (re-exported for the benches)


@dataclass(slots=True)
class Timing:
    """One request, times from time.perf_counter()."""

    submitted: float
    first_token: float | None  # None where the system does not expose it (non-streamed HTTP)
    done: float
    prompt_tokens: int
    new_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.submitted

    @property
    def decode_rate(self) -> float:
        """Tokens/s after the first token (the first one pays for the prefill)."""
        return (self.new_tokens - 1) / (self.done - self.first_token)


def aggregate_rate(timings: list[Timing]) -> float:
    """New tokens of all requests over the wall time from first submit to last finish."""
    wall = max(t.done for t in timings) - min(t.submitted for t in timings)
    return sum(t.new_tokens for t in timings) / wall


def median(values: list[float]) -> float:
    return statistics.median(values)


class PromptMaker:
    """Token-id prompts that never share a first KV block with each other, so neither our prefix
    cache nor llama-server's can serve one prompt from another (every call gives a fresh prompt)."""

    SHORT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
    LONG = ("The history of lighthouses begins with fires lit on hilltops to guide ships, and grows into "
            "towers of stone with lenses that throw a beam for miles across the water. Keepers trimmed wicks, "
            "wound clockwork, polished brass and logged every passing vessel through long winter nights. ")

    def __init__(self, encode) -> None:
        self.encode = encode  # str -> list[int], no special tokens
        self._ids = itertools.count()
        self._long_body = encode(self.LONG * 40)

    def _unique_head(self) -> list[int]:
        i = next(self._ids)
        return self.encode(f"Request {i} ({i * 7919 % 10007}) of the benchmark. ")

    def short(self) -> list[int]:
        return self._unique_head() + self.encode(self.SHORT)

    def long(self, num_tokens: int) -> list[int]:
        head = self._unique_head()
        body = self._long_body
        while len(body) < num_tokens:
            body = body + body
        return head + body[: num_tokens - len(head)]


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 10) -> float:
    """Memory bandwidth in bytes/s of copying an `nbytes` tensor (read + write counted)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _bytes_read(obj) -> int:
    """Bytes one decode step reads from a weight: a tensor, or a layerserve Linear (its 1-row kernel's)."""
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return obj.bytes_read(1)  # a layerserve Linear: what its one-row kernel reads


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every layer weight, the final norm and the LM head once.
    The embedding lookup reads one row, so it is left out (when tied, the matrix counts as the head)."""
    parts = [w for layer in model.layers for w in layer.values()] + [model.norm, model.lm_head]
    return sum(_bytes_read(w) for w in parts)


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a server, then SIGKILL it if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
