"""Linear layers that run, per batch size, the matmul kernel measured fastest on this CPU.

Decode is bound by reading weights, so small batches want low-bit weights (torch's int4 group-32
kernel reads a quarter of the bytes of bf16); prefill chunks want a dense GEMM. Which kernel wins
where depends on the CPU, so the choice is measured (layerserve.model.kernel_choice) and handed
here as a ladder of (most rows, kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GROUP = 32
QUANTIZED = ("q4", "q8", "int4", "int8")


def int4_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def quantize_int4(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (packed int4, scales_and_zeros (K/32, N, 2)) with w ~ (q - 8) * s + z.

    Asymmetric min/max per group of 32 along K. On GGUF Q4_0/Q4_1 weights every group already
    lies on such a grid (min at q=0, max at q=15), so re-quantizing them recovers it exactly.
    """
    n, k = weight.shape
    w = weight.float().view(n, k // GROUP, GROUP)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, K/32)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = ((w - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32).view(n, k)
    zero = lo + 8 * scale
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (K/32, N, 2)
    return packed, scales_zeros


def dequantize_int4_reference(weight: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The values the int4 kernel multiplies by, as a dense tensor like `weight`."""
    n, k = weight.shape
    sz = scales_zeros.float().transpose(0, 1)  # (N, K/32, 2)
    scale, zero = sz[..., 0:1], sz[..., 1:2]
    w = weight.float().view(n, k // GROUP, GROUP)
    lo = zero - 8 * scale
    q = ((w - lo) / scale.clamp(min=1e-10)).round().clamp(0, 15)
    return ((q - 8) * scale + zero).view(n, k).to(weight.dtype)


class Linear:
    """y = x W^T (+ b), with a kernel per batch size.

    `ladder` is [(most rows, kernel name)] from a KernelPlan (layerserve.model.kernel_choice):
    each call runs the first kernel whose bound covers its rows. Without a ladder it is a dense
    matmul in the weight's dtype. Every kernel multiplies by the same values where it can: when
    the ladder holds a quantized kernel, the dense kernels use its dequantized weights, so results
    depend on the batch size only through accumulation order (and int8 vs int4 rounding when a
    ladder mixes the two).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 ladder: list[tuple[int, str]] | None = None, act_dtype: torch.dtype | None = None) -> None:
        from layerserve.model.kernel_choice import KERNELS, _int8_dequantized

        self.bias = bias
        self.out_features = weight.shape[0]
        dtype = act_dtype or weight.dtype
        self._ladder: list[tuple[int, Callable, object]] = []
        self._names: list[str] = []
        if not ladder:
            self._ladder = [(1 << 62, _dense, weight)]
            self._names = ["dense"]
            return
        names = {name for _, name in ladder}
        if weight.shape[1] % GROUP:
            names = {"f32" if name in QUANTIZED else name for name in names}
            ladder = [(rows, "f32" if name in QUANTIZED else name) for rows, name in ladder]
        w = weight.float()
        states: dict[str, object] = {}
        if "q4" in names:  # the same grid as int4 (min/max per 32): both then multiply by these values
            states["q4"] = KERNELS["q4"].prepare(w, dtype)
            w = states["q4"].dequantize()
        if "q8" in names:
            states["q8"] = KERNELS["q8"].prepare(w, dtype)
            if "q4" not in names:
                w = states["q8"].dequantize()
        if "int4" in names:
            states["int4"] = KERNELS["int4"].prepare(w, dtype)
            w = dequantize_int4_reference(w, states["int4"][1])
        if "int8" in names:
            states["int8"] = KERNELS["int8"].prepare(w, dtype)
            if "int4" not in names:
                w = _int8_dequantized(states["int8"])
        for name in names - states.keys():
            states[name] = KERNELS[name].prepare(w, dtype)
        # Only the kernels' own states are kept (`w`, a float32 copy, is one of them only when a
        # float32 kernel runs): a dense copy beside packed weights would multiply resident memory.
        self._ladder = [(rows, KERNELS[name].run, states[name]) for rows, name in ladder]
        self._ladder[-1] = (1 << 62, *self._ladder[-1][1:])  # the last kernel covers any larger batch
        self._names = [name for _, name in ladder]

    def kernel_at(self, rows: int) -> tuple[str, object]:
        """(kernel name, its state) that a call with `rows` rows runs ("dense": the plain weight)."""
        for (max_rows, _, state), name in zip(self._ladder, self._names):
            if rows <= max_rows:
                return name, state
        raise AssertionError("unreachable: the last kernel covers every batch")

    def bytes_read(self, rows: int = 1) -> int:
        """Bytes of weights one call with `rows` rows reads (for bandwidth bounds in benchmarks)."""
        state = next(st for max_rows, _, st in self._ladder if rows <= max_rows)
        parts = state if isinstance(state, tuple) else (state,)
        total = sum(p.nbytes if hasattr(p, "nbytes") else 0 for p in parts)
        return total + (self.bias.nbytes if self.bias is not None else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        for max_rows, run, state in self._ladder:
            if rows <= max_rows:
                y = run(x, state)
                return y if self.bias is None else y + self.bias
        raise AssertionError("unreachable: the last kernel covers every batch")


def _dense(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)
