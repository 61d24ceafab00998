"""Compiled CPU kernels (built on first use, cached under the user's cache dir)."""

from layerserve.kernels.q4 import (
    Q4Weight,
    available,
    cpu_paths,
    dequantize_q4,
    from_gguf,
    load_info,
    pack_dense,
    pack_q4,
    q4_matmul,
    q4_matmul_reference,
    quantize_q4,
    unavailable_reason,
    unpack_q4,
)

__all__ = [
    "Q4Weight", "available", "cpu_paths", "dequantize_q4", "from_gguf", "load_info", "pack_dense", "pack_q4",
    "q4_matmul", "q4_matmul_reference", "quantize_q4", "unavailable_reason", "unpack_q4",
]
