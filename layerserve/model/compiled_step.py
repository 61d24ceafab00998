"""The model's forward for a few rows as one C++ call (layerserve/kernels/decode_step.cpp).

The eager forward (LlamaModel.forward) is the reference: ~15 torch ops per layer, each paying
Python and dispatcher time that, at one or a few rows, costs more than the matmuls. The compiled
step runs every layer in one call with the kernels the eager step would run at that row count, so
it is available where those kernels are ones the C++ step calls (our int4/int8 kernels, dense
float32/bf16) and activations and KV are float32: the default path.

Rows are any flattened tokens whose context is in the KV pool: a decode batch (one row per
sequence) or a few rows of one sequence (a draft being verified). StepRows says, per row, its
position, the slot its K/V goes to, and which first slots of which context row it attends to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# kind codes of decode_step.cpp
_KINDS = {"q4": 0, "q8": 1, "f32": 2, "bf16": 2, "dense": 2}
MAX_ROWS = 64  # beyond this a step is prefill-shaped: the eager path's GEMMs and SDPA win


@dataclass(slots=True)
class StepRows:
    """Where each row of a compiled step reads and writes the KV pool."""

    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: the slot row t's K/V is written to
    ctx_slots: torch.Tensor  # (S, W) int64: context slots of each sequence in the step
    row_seq: torch.Tensor  # (T,) int64: which ctx_slots row row t attends over
    row_len: torch.Tensor  # (T,) int64: how many of its first slots (position + 1)


def _unavailable_reason(model) -> str | None:
    if model.dtype != torch.float32:
        return f"activations are {model.dtype}, the compiled step computes in float32"
    from layerserve.kernels import q4

    if not q4.available():
        return f"the kernel library is unavailable ({q4.unavailable_reason()})"
    return None


class CompiledStep:
    """`model`: a LlamaModel. Call `rows_supported(T)` before `__call__`."""

    def __init__(self, model) -> None:
        self.model = model
        self.reason = _unavailable_reason(model)
        self._args: dict[int, tuple[list, list[int]] | None] = {}
        c = model.config
        self._dims = [c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, int(c.qk_norm), 1]
        if self.reason is not None:
            log.info("compiled decode step off: %s", self.reason)
        else:
            from layerserve.kernels import q4

            self._op = torch.ops.layerserve_q4.decode_step.default
            self._path = q4.default_path_code()

    @property
    def available(self) -> bool:
        return self.reason is None

    def rows_supported(self, rows: int) -> bool:
        return self.available and 0 < rows <= MAX_ROWS and self._arguments(rows) is not None

    def _arguments(self, rows: int) -> tuple[list, list[int]] | None:
        """(tensors, linear ints) for a step of `rows` rows, or None when some layer's kernel at that
        size is one the C++ step does not run (torch's int4/int8 kernels)."""
        if rows in self._args:
            return self._args[rows]
        tensors: list[torch.Tensor | None] = []
        ints: list[int] = []
        ok = True
        for layer in self.model.layers:
            parts = {}
            for key in ("qkv", "o", "gate_up", "down"):
                lin = layer[key]
                name, state = lin.kernel_at(rows)
                if name not in _KINDS or (key != "qkv" and lin.bias is not None):
                    ok = False
                    break
                parts[key] = state.data if _KINDS[name] < 2 else state
                ints += [_KINDS[name], lin.out_features]
            if not ok:
                break
            bias = layer["qkv"].bias
            tensors += [layer["ln1"], parts["qkv"], None if bias is None else bias.float(), parts["o"],
                        layer["q_norm"], layer["k_norm"], layer["ln2"], parts["gate_up"], parts["down"]]
        tensors.append(self.model.norm)
        self._args[rows] = (tensors, ints) if ok else None
        return self._args[rows]

    def __call__(self, input_ids: torch.Tensor, rows: StepRows, kv: torch.Tensor) -> torch.Tensor:
        """input_ids (T,) -> final hidden states (T, D), writing this step's K/V into `kv`."""
        m = self.model
        args = self._arguments(input_ids.shape[0])
        if args is None:
            raise ValueError(f"no compiled step for {input_ids.shape[0]} rows")
        x = torch.nn.functional.embedding(input_ids, m.embed)
        return self._op(x, args[0], args[1], self._dims, m.config.rms_norm_eps, kv, m.cos, m.sin,
                        rows.positions, rows.slot_mapping, rows.ctx_slots, rows.row_seq, rows.row_len, self._path)
