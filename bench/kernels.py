"""Low-bit matmul kernels on the default model's shapes: time per token at M = 1..16 rows.

    .venv/bin/python bench/kernels.py [--rounds 7] [--ms 1,2,4,8,16] [--layers 30] [--threads 2]
                                      [--only q4-avx512,q8-avx512,torch-int4-f32,...] [--out bench/out/kernels.md]

    --layers 0 times the head only (the output head question: q8 vs q4 vs torch int8 vs dense).

SmolLM2-135M's projections, per layer: qkv (N=960, K=576), o (576, 576), gate_up (3072, 576),
down (576, 1536); `--layers` (30) layers of DISTINCT weights, so the ~53 MB of int4 (66 MB with
scales) do not sit in cache, and the head (49152, 576) timed on its own. Candidates:

  q4-avx512 / q4-avx2 / q4-plain   layerserve.kernels.q4 (int4 Q4_1 x int8 activations), one path forced
  q8-avx512 / q8-avx2 / q8-plain   layerserve.kernels.q4.q8_matmul (int8 Q8_0, fp16 scale per 32, x int8
                                   activations): the tied Q8_0 embedding read as the head without dequantizing
  q4-<path>-precise / q8-<path>-precise   the same with precise=True: a second int8 pass over the
                                   activations' quantization residual (two activation rows per row)
  torch-int4-f32 / -bf16           torch._weight_int4pack_mm_for_cpu, float32 / bfloat16 activations
  torch-int8-f32                   torch._weight_int8pack_mm (int8 weights, per-row scale), float32 activations
  dense-bf16 / dense-f32           F.linear

Rounds are interleaved (every candidate at every M, in a rotating order, then the next round) and
the tables show medians. Also printed: the machine's read bandwidth (a sum over a 1 GiB tensor,
all threads) and the weight-bandwidth bound per token it implies for each format, and how busy
other processes kept the CPUs (/proc/stat), since a shared machine moves these numbers.
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import platform
import statistics
import sys
import time

_BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import CpuWatch, cpu_model_name  # noqa: E402
from layerserve.kernels import q4  # noqa: E402

HIDDEN, INTER, VOCAB = 576, 1536, 49152
LAYER_SHAPES = {"qkv": (960, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
HEAD_SHAPE = (VOCAB, HIDDEN)
ALL = ["q4-avx512", "q4-avx2", "q4-plain", "q8-avx512", "q8-avx2", "q8-plain",
       "q4-avx512-precise", "q4-avx2-precise", "q8-avx512-precise", "q8-avx2-precise", "torch-int4-f32", "torch-int4-bf16", "torch-int8-f32", "dense-bf16", "dense-f32"]
DEFAULT = [c for c in ALL if not c.endswith("-plain")]


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of summing an `nbytes` float32 tensor with torch's threads (a pure read stream)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    del x
    return nbytes / statistics.median(times)


def _kernel_path(name: str) -> str | None:
    """q4-avx512-precise -> avx512; None for the non-layerserve candidates."""
    if not name.startswith(("q4-", "q8-")):
        return None
    return name[3:].removesuffix("-precise")


class Candidate:
    """One kernel: weights for every matrix in its own format, and the call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.layers: list[list[tuple[object, int]]] = []  # per layer, per shape: (weight, K)
        self.head = None
        self.nbytes_layers = 0
        self.nbytes_head = 0
        precise = name.endswith("-precise")
        path = _kernel_path(name)
        if name.startswith("q4-"):
            self.act_dtype = torch.float32
            self.fn = lambda x, w: q4.q4_matmul(x, w, path, precise)
        elif name.startswith("q8-"):
            self.act_dtype = torch.float32
            self.fn = lambda x, w: q4.q8_matmul(x, w, path, precise)
        elif name == "torch-int4-f32":
            self.act_dtype = torch.float32
            self.fn = lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1])
        elif name == "torch-int4-bf16":
            self.act_dtype = torch.bfloat16
            self.fn = lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1])
        elif name == "torch-int8-f32":
            self.act_dtype = torch.float32
            self.fn = lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1])
        elif name == "dense-bf16":
            self.act_dtype = torch.bfloat16
            self.fn = F.linear
        elif name == "dense-f32":
            self.act_dtype = torch.float32
            self.fn = F.linear
        else:
            raise ValueError(name)

    def convert(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, dense: torch.Tensor):
        """(weight object, bytes) from the int4 groups (q, d, m) and their dequantized dense matrix."""
        n, k = q.shape
        if self.name.startswith("q4-"):
            w = q4.pack_q4(q, d, m)
            return w, w.nbytes
        if self.name.startswith("q8-"):
            w = q4.pack_q8_dense(dense)
            return w, w.nbytes
        if self.name.startswith("torch-int4"):
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            # torch: w = (q - 8) * scale + zero  ->  scale = d, zero = m + 8d
            sz = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous().to(self.act_dtype)
            return (packed, sz), packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
        if self.name == "torch-int8-f32":
            scale = dense.abs().amax(dim=1).clamp(min=1e-10) / 127
            w8 = (dense / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            return (w8, scale.float()), w8.numel() + scale.numel() * 4
        w = dense.to(self.act_dtype).contiguous()
        return w, w.numel() * w.element_size()

    def run_layers(self, xs: dict[int, torch.Tensor]) -> None:
        fn = self.fn
        for layer in self.layers:
            for w, k in layer:
                fn(xs[k], w)

    def run_head(self, x: torch.Tensor) -> None:
        self.fn(x, self.head)


def random_q4(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A Q4_1-like matrix: random nibbles, scales ~ 0.01, mins ~ -8 scales; plus its dense form."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 0.002).half().float()
    m = (-8 * d * (0.8 + 0.4 * torch.rand(n, k // 32, generator=gen))).half().float()
    dense = (q.float().view(n, k // 32, 32) * d[..., None] + m[..., None]).view(n, k)
    return q, d, m, dense


def build(names: list[str], num_layers: int) -> list[Candidate]:
    cands = [Candidate(n) for n in names]
    gen = torch.Generator().manual_seed(0)
    for _ in range(num_layers):
        per = [[] for _ in cands]
        for n, k in LAYER_SHAPES.values():
            q, d, m, dense = random_q4(n, k, gen)
            for c, lst in zip(cands, per):
                w, b = c.convert(q, d, m, dense)
                lst.append((w, k))
                c.nbytes_layers += b
        for c, lst in zip(cands, per):
            c.layers.append(lst)
    q, d, m, dense = random_q4(*HEAD_SHAPE, gen)
    for c in cands:
        c.head, c.nbytes_head = c.convert(q, d, m, dense)
    gc.collect()
    return cands


def call_overhead_us(repeats: int = 2000) -> float:
    """Python-to-kernel cost of one q4_matmul on a tiny matrix (16 x 32, M=1)."""
    w = q4.pack_dense(torch.randn(16, 32))
    x = torch.randn(1, 32)
    for _ in range(100):
        q4.q4_matmul(x, w)
    t0 = time.perf_counter()
    for _ in range(repeats):
        q4.q4_matmul(x, w)
    return (time.perf_counter() - t0) / repeats * 1e6


def measure(cands: list[Candidate], ms: list[int], rounds: int) -> tuple[dict, dict, float]:
    gen = torch.Generator().manual_seed(1)
    inputs = {m: {k: torch.randn(m, k, generator=gen) for k in (HIDDEN, INTER)} for m in ms}
    layer_t = {(c.name, m): [] for c in cands for m in ms}
    head_t = {(c.name, m): [] for c in cands for m in ms}
    watch = CpuWatch()
    watch.start()
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        for mi, m in enumerate(ms):
            order = cands[(r + mi) % len(cands):] + cands[:(r + mi) % len(cands)]
            for c in order:
                xs = {k: v.to(c.act_dtype) for k, v in inputs[m].items()}
                t0 = time.perf_counter()
                c.run_layers(xs)
                t1 = time.perf_counter()
                c.run_head(xs[HIDDEN])
                t2 = time.perf_counter()
                if r:
                    layer_t[c.name, m].append(t1 - t0)
                    head_t[c.name, m].append(t2 - t1)
    busy = watch.stop()
    med = lambda d: {key: statistics.median(v) for key, v in d.items()}  # noqa: E731
    best = lambda d: {key: min(v) for key, v in d.items()}  # noqa: E731
    return med(layer_t), med(head_t), best(layer_t), best(head_t), busy


def table(title: str, cands: list[Candidate], ms: list[int], times: dict, nbytes: dict, bw: float) -> str:
    head = f"| {title} | MB | bound ms |" + "".join(f" M={m} |" for m in ms) + " GB/s at M=1 |"
    sep = "|---|---:|---:|" + "---:|" * len(ms) + "---:|"
    rows = [head, sep]
    for c in cands:
        b = nbytes[c.name]
        cells = "".join(f" {times[c.name, m] * 1e3:.2f} |" for m in ms)
        gbs = b / times[c.name, ms[0]] / 1e9 if ms else float("nan")
        rows.append(f"| {c.name} | {b / 1e6:.1f} | {b / bw * 1e3:.2f} |{cells} {gbs:.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ms", default="1,2,4,8,16")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--out", default=None, help="also write the report (Markdown) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ms = [int(v) for v in args.ms.split(",")]
    names = args.only.split(",") if args.only else list(DEFAULT)
    paths = q4.cpu_paths()
    if not q4.available():
        print(f"q4 kernel unavailable: {q4.unavailable_reason()}")
    skipped = [n for n in names if n.startswith(("q4-", "q8-")) and _kernel_path(n) not in paths]
    names = [n for n in names if n not in skipped]

    lines = []
    out = lambda s="": (print(s, flush=True), lines.append(s))  # noqa: E731
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx", "amx", "fma", "f16c"))})
    out(f"host: {cpu_model_name()}, {os.cpu_count()} CPUs, {platform.python_version()}, torch {torch.__version__}, "
        f"{args.threads} threads")
    out(f"CPU flags: {' '.join(flags)}")
    info = q4.load_info()
    out(f"q4 kernel: paths {paths or 'none'}, load {info['seconds']:.2f} s ({'compiled now' if info['built'] else 'cached'})")
    if skipped:
        out(f"skipped (this CPU lacks the path): {', '.join(skipped)}")
    if paths:
        out(f"q4_matmul call overhead (16x32 matrix, M=1): {call_overhead_us():.1f} us")
    with open("/proc/loadavg") as f:
        out(f"load average before: {' '.join(f.read().split()[:3])}")

    bw = read_bandwidth()
    out(f"read bandwidth (sum over 1 GiB, {args.threads} threads): {bw / 1e9:.1f} GB/s")
    t0 = time.perf_counter()
    cands = build(names, args.layers)
    out(f"weights built in {time.perf_counter() - t0:.1f} s; {args.layers} layers x 4 matmuls, rounds {args.rounds}")
    layer_t, head_t, layer_best, head_best, busy = measure(cands, ms, args.rounds)
    bw_after = read_bandwidth()
    out(f"other processes kept {busy:.2f} cores busy while measuring; read bandwidth after: {bw_after / 1e9:.1f} GB/s")
    out()
    if args.layers:
        out(f"Layers: ms per token for the {4 * args.layers} layer matmuls (median of {args.rounds} rounds); "
            f"'bound' = weight bytes / read bandwidth")
        out()
        out(table("layers", cands, ms, layer_t, {c.name: c.nbytes_layers for c in cands}, bw))
        out()
    out(f"Head (N={HEAD_SHAPE[0]}, K={HEAD_SHAPE[1]}): ms per call")
    out()
    out(table("head", cands, ms, head_t, {c.name: c.nbytes_head for c in cands}, bw))
    out()
    out("Best of the rounds (what an uncontended run approaches; medians above are the figures to quote)")
    out()
    if args.layers:
        out(table("layers, best", cands, ms, layer_best, {c.name: c.nbytes_layers for c in cands}, bw))
        out()
    out(table("head, best", cands, ms, head_best, {c.name: c.nbytes_head for c in cands}, bw))
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
