"""Decode GGUF tensor data to torch, vectorized.

Q4_0, Q4_1, Q8_0, F16, BF16 and F32 are decoded here in torch (fast); other types (K-quants, IQ)
go through the `gguf` package's numpy dequantizers.
"""

from __future__ import annotations

import numpy as np
import torch

# ggml type id -> (block elements, block bytes)
_F32, _F16, _Q4_0, _Q4_1, _Q8_0, _BF16 = 0, 1, 2, 3, 8, 30


def _blocks(data: np.ndarray, block_bytes: int) -> torch.Tensor:
    return torch.from_numpy(np.array(data, copy=True)).view(-1, block_bytes)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(B, 16) packed bytes -> (B, 32) values: low nibbles are elements 0-15, high ones 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def decode_tensor(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes of one tensor -> float32 tensor in torch order (shape reversed from ggml's)."""
    torch_shape = tuple(reversed(shape))
    if ggml_type == _F32:
        return torch.from_numpy(np.array(data.view(np.float32), copy=True)).view(torch_shape)
    if ggml_type == _F16:
        return torch.from_numpy(np.array(data.view(np.float16), copy=True)).float().view(torch_shape)
    if ggml_type == _BF16:
        return torch.from_numpy(np.array(data.view(np.int16), copy=True)).view(torch.bfloat16).float().view(torch_shape)
    if ggml_type == _Q4_0:
        b = _blocks(data, 18)
        d = b[:, :2].contiguous().view(torch.float16).float()  # (B, 1)
        return ((_nibbles(b[:, 2:]).float() - 8.0) * d).view(torch_shape)
    if ggml_type == _Q4_1:
        b = _blocks(data, 20)
        d = b[:, :2].contiguous().view(torch.float16).float()
        m = b[:, 2:4].contiguous().view(torch.float16).float()
        return (_nibbles(b[:, 4:]).float() * d + m).view(torch_shape)
    if ggml_type == _Q8_0:
        b = _blocks(data, 34)
        d = b[:, :2].contiguous().view(torch.float16).float()
        return (b[:, 2:].contiguous().view(torch.int8).float() * d).view(torch_shape)
    import gguf

    array = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(ggml_type))
    return torch.from_numpy(np.asarray(array, dtype=np.float32).copy()).view(torch_shape)


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return int(np.prod(shape)) // block * size
