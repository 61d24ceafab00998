"""Which matmul kernel each linear layer uses, chosen by measuring them on this CPU.

Hosts differ: torch's int4 kernel wins single-row decode on some and loses on others, bf16 GEMMs
are fast where the CPU has AVX512-BF16 or AMX and emulated (slow) where it has not, and the best
kernel for 1 row is rarely the best for 256. So at start-up every candidate kernel is timed on the
model's own shapes at a ladder of row counts, the fastest is kept per (shape, rows), and the
result is cached on disk per CPU model, CPU flags, torch version and thread count, so a second
start reads it back. A dtype the CPU only emulates is never a candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from layerserve.model.cpu_load import CpuWatch

log = logging.getLogger("layerserve.engine")

GROUP = 32
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PLAN_VERSION = 4
MAX_OTHER_CORES = 0.25  # other processes' CPU (cores) above which a measured plan is not cached


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]

    @classmethod
    def detect(cls) -> CpuFeatures:
        model, flags = "unknown", frozenset()
        try:
            text = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
        return cls(model, flags)

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (without them torch emulates bf16 GEMMs in fp32, slowly)."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    def summary(self) -> str:
        names = [("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX512F"), ("avx512_vnni", "AVX512-VNNI"),
                 ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"),
                 ("amx_int8", "AMX-INT8")]
        return " ".join(label for flag, label in names if flag in self.flags) or "no SIMD flags seen"


# ---- the candidate kernels -------------------------------------------------------------------------
# prepare(weight (N, K) float32, activation dtype) -> state; run(x (M, K), state) -> (M, N) in x's dtype.
def _int4_prepare(w: torch.Tensor, dtype: torch.dtype):
    """torch's int4 kernel is only vectorized for bf16 activations (with float32 ones it was 10x
    slower even at one row, measured): scales in bf16, activations converted per call."""
    from layerserve.model.linear import quantize_int4

    return quantize_int4(w, torch.bfloat16)


def _int4_run(x: torch.Tensor, state) -> torch.Tensor:
    packed, scales_zeros = state
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, GROUP, scales_zeros).to(x.dtype)


def _int8_prepare(w: torch.Tensor, dtype: torch.dtype):
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    return (w / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8), scale.to(dtype)


def _int8_dequantized(state) -> torch.Tensor:
    q, scale = state
    return q.float() * scale.float().unsqueeze(1)


def _q4_prepare(w: torch.Tensor, dtype: torch.dtype):
    from layerserve.kernels import q4

    return q4.pack_dense(w)


def _q8_prepare(w: torch.Tensor, dtype: torch.dtype):
    from layerserve.kernels import q4

    return q4.pack_q8_dense(w)


def _precise(matmul: Callable) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """Our kernels with two int8 passes over each activation row: the row, then its quantization
    residual (x = dx*q1 + dr*q2), in one read of the weights. One int8 pass agreed with float32 on
    97.8% of next tokens (q4 layers, teacher-forced over tests/fixtures/GPL-3.txt); two passes on
    the layers and the head, 99.95%."""
    def run(x: torch.Tensor, state) -> torch.Tensor:
        y = matmul(x, state, precise=True)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    return run


def _q4_matmul(x, state, precise):
    from layerserve.kernels import q4

    return q4.q4_matmul(x, state, precise=precise)


def _q8_matmul(x, state, precise):
    from layerserve.kernels import q4

    return q4.q8_matmul(x, state, precise=precise)


@dataclass(frozen=True, slots=True)
class Kernel:
    name: str
    prepare: Callable[[torch.Tensor, torch.dtype], object]
    run: Callable[[torch.Tensor, object], torch.Tensor]
    describe: str


KERNELS: dict[str, Kernel] = {
    "int4": Kernel("int4", _int4_prepare, _int4_run, "torch int4 group-32 (_weight_int4pack_mm_for_cpu), bf16 activations"),
    "q4": Kernel("q4", _q4_prepare, _precise(_q4_matmul),
                 "layerserve int4 group-32 (scale + min) x two-pass int8 activations (AVX512-VNNI / AVX2 / C++)"),
    "q8": Kernel("q8", _q8_prepare, _precise(_q8_matmul),
                 "layerserve int8 group-32 x two-pass int8 activations (AVX512-VNNI / AVX2 / C++)"),
    "int8": Kernel("int8", _int8_prepare, lambda x, s: torch._weight_int8pack_mm(x, s[0], s[1]),
                   "torch int8 per-row (_weight_int8pack_mm)"),
    "bf16": Kernel("bf16", lambda w, dtype: w.to(torch.bfloat16),
                   lambda x, s: F.linear(x.to(torch.bfloat16), s).to(x.dtype), "dense bf16 GEMM"),
    "f32": Kernel("f32", lambda w, dtype: w.float(), lambda x, s: F.linear(x.float(), s).to(x.dtype),
                  "dense float32 GEMM"),
}
QUANTIZED_KERNELS = ("q4", "q8", "int4", "int8")


def candidates(cpu: CpuFeatures, quantized: bool) -> list[str]:
    """Kernels worth timing here. Quantized weights may run on any kernel; bf16 only where native."""
    names = ["f32"]
    if cpu.native_bf16:
        names.append("bf16")
    if quantized:
        from layerserve.kernels import q4

        if q4.available():
            names += ["q4", "q8"]
        else:
            log.warning("layerserve's int4 kernel is unavailable (%s); using torch's kernels", q4.unavailable_reason())
        if hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            names.append("int4")
        if hasattr(torch, "_weight_int8pack_mm"):
            names.append("int8")
    return names


@dataclass(slots=True)
class KernelPlan:
    """Per weight shape, the kernel for each row bucket, and the timings that chose it."""

    choices: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # "NxK" -> [(max rows, kernel)]
    timings: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)  # shape -> kernel -> rows -> s

    def kernel_for(self, n: int, k: int, rows: int) -> str:
        ladder = self.choices[f"{n}x{k}"]
        for max_rows, name in ladder:
            if rows <= max_rows:
                return name
        return ladder[-1][1]

    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "choices": self.choices,
                "timings": {s: {k: {str(r): t for r, t in v.items()} for k, v in kt.items()}
                            for s, kt in self.timings.items()}}

    @classmethod
    def from_json(cls, data: dict) -> KernelPlan:
        if data.get("version") != PLAN_VERSION:
            raise ValueError("stale kernel plan")
        return cls({s: [(int(r), k) for r, k in ladder] for s, ladder in data["choices"].items()},
                   {s: {k: {int(r): t for r, t in v.items()} for k, v in kt.items()}
                    for s, kt in data["timings"].items()})

    def table(self) -> str:
        """The measured timings per candidate (microseconds) and the choice, one line per shape and rows."""
        used = sorted({name for per_kernel in self.timings.values() for name in per_kernel})
        lines = [f"  {name}: {KERNELS[name].describe}" for name in used if name in KERNELS]
        for shape, per_kernel in self.timings.items():
            rows = sorted({r for v in per_kernel.values() for r in v})
            for r in rows:
                cells = "  ".join(f"{name} {per_kernel[name][r] * 1e6:8.0f}" for name in per_kernel if r in per_kernel[name])
                lines.append(f"  {shape:>10} rows {r:>4}: {cells}   -> {self.kernel_for(*map(int, shape.split('x')), r)}")
        return "\n".join(lines)


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (first-call allocations, packing caches)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(shapes: Iterable[tuple[int, int, int]], names: list[str], reps: int = 5,
            buckets: tuple[int, ...] = ROW_BUCKETS, exclude: dict[str, set[str]] | None = None) -> KernelPlan:
    """Time each kernel on each (N, K, most rows) shape at each row bucket; keep the fastest.
    `exclude`: per "NxK", kernels not allowed there (for accuracy)."""
    plan = KernelPlan()
    gen = torch.Generator().manual_seed(0)
    for n, k, max_rows in shapes:
        key = f"{n}x{k}"
        w = torch.randn(n, k, generator=gen) * 0.02
        banned = (exclude or {}).get(key, set())
        usable = [name for name in names
                  if (name not in QUANTIZED_KERNELS or k % GROUP == 0) and name not in banned]
        states = {name: KERNELS[name].prepare(w, torch.float32) for name in usable}
        per_kernel: dict[str, dict[int, float]] = {name: {} for name in usable}
        ladder: list[tuple[int, str]] = []
        alive = list(usable)
        for rows in [b for b in buckets if b <= max_rows] or [buckets[0]]:
            x = torch.randn(rows, k, generator=gen)
            for name in alive:
                kernel, state = KERNELS[name], states[name]
                per_kernel[name][rows] = _time(lambda: kernel.run(x, state), reps)
            best = min(alive, key=lambda name: per_kernel[name][rows])
            ladder.append((rows, best))
            # a low-bit kernel 3x slower than the best only falls further behind as rows grow (its
            # cost is linear in rows; a dense GEMM's is amortized): stop timing it
            alive = [name for name in alive
                     if name not in QUANTIZED_KERNELS or per_kernel[name][rows] <= 3 * per_kernel[best][rows]]
        plan.choices[key] = ladder
        plan.timings[key] = per_kernel
    return plan


def cache_path(cpu: CpuFeatures, shapes: list[tuple[int, int, int]], names: list[str]) -> pathlib.Path:
    root = pathlib.Path(os.environ.get("LAYERSERVE_CACHE", "~/.cache/layerserve")).expanduser()
    key = json.dumps([PLAN_VERSION, torch.__version__, cpu.model, sorted(cpu.flags), torch.get_num_threads(),
                      sorted(shapes), names])
    return root / "kernels" / f"plan-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def choose_kernels(shapes: list[tuple[int, int, int]], quantized: bool, cpu: CpuFeatures | None = None,
                   exclude: dict[str, set[str]] | None = None) -> KernelPlan:
    """The plan for these shapes: read from the cache, or measured now (and cached)."""
    cpu = cpu or CpuFeatures.detect()
    names = candidates(cpu, quantized)
    path = cache_path(cpu, shapes, names + sorted(f"{s}-{k}" for s, ks in (exclude or {}).items() for k in ks))
    try:
        plan = KernelPlan.from_json(json.loads(path.read_text()))
        log.info("kernels for %s (%s, %d threads), measured earlier (%s); median time per call, us:\n%s",
                 cpu.model, cpu.summary(), torch.get_num_threads(), path, plan.table())
        return plan
    except (OSError, ValueError, KeyError):
        pass
    started = time.perf_counter()
    watch = CpuWatch()
    watch.start()
    plan = measure(shapes, names, exclude=exclude)
    others = watch.stop()
    log.info("measured kernels on %s (%s, %d threads) in %.1f s; median time per call, us:\n%s",
             cpu.model, cpu.summary(), torch.get_num_threads(), time.perf_counter() - started, plan.table())
    if others > MAX_OTHER_CORES:
        log.warning("other processes used %.2f cores while the kernels were timed: this plan is used now but "
                    "not cached, so the next start measures again", others)
        return plan
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # several servers may start at once
        tmp.write_text(json.dumps(plan.to_json()))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not cache the kernel plan at %s: %s", path, exc)
    return plan
