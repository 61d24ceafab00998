"""Linear layers: dense, or int4 weights (group 32) for small batches.

Decode is bound by reading weights; torch's CPU int4 kernel reads a quarter of the bytes of bf16
weights. For large batches (prefill chunks) a dense bf16 GEMM is faster, so the int4 layer keeps
both and picks per call by the number of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP = 32


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
    """y = x W^T (+ b). With `int4=True`, batches of at most `int4_max_rows` rows use int4 weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, int4: bool = False, int4_max_rows: int = 8) -> None:
        self.weight = weight  # (N, K) in the model dtype
        self.bias = bias
        self.int4_max_rows = int4_max_rows
        self.packed = self.scales_zeros = None
        if int4 and weight.shape[1] % GROUP == 0:
            self.packed, self.scales_zeros = quantize_int4(weight, weight.dtype)
            # Dense path uses the same (dequantized) values, so results do not depend on batch size
            # beyond accumulation order.
            self.weight = dequantize_int4_reference(weight, self.scales_zeros)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] <= self.int4_max_rows:
            y = torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
