"""Int4 (group 32, scale + min) x int8-activation matmul for CPU decode, as llama.cpp's Q4_1 x Q8_1.

    y = x W^T,  W[n, k] = d[n, g] * q[n, k] + m[n, g]   (g = k // 32, q in 0..15: GGUF Q4_1; Q4_0: m = -8d)

x is quantized per row and group of 32 to int8 (dx = max|x| / 127, qx = round-half-even(x / dx)),
so each group is one integer dot product plus two float terms:

    y[i, n] = sum_g (d[n, g] * dx[i, g]) * sum_k q[n, k] qx[i, k]  +  m[n, g] * (dx[i, g] * sum_k qx[i, k])

The C++ kernel (q4_gemm.cpp: AVX512-VNNI, AVX2 and plain paths, chosen at run time) is compiled on
first use into the user's cache dir and loaded as the torch op `torch.ops.layerserve_q4.matmul`
(so torch.compile sees an opaque op, not a graph break). `q4_matmul_reference` does the same
arithmetic in torch; the tests hold the kernel to it. Where the build fails, `available()` is False
and `unavailable_reason()` says why; nothing else breaks.

precise=True (both ops, and the Python wrappers and references): each activation row is quantized
twice, x ~ dx*q1 + r with r = x - dx*q1 (float32), r quantized again per group (dr = max|r|/127, q2),
and y = sum_g d*(dx*isum(q,q1) + dr*isum(q,q2)) + m*(dx*sum(q1) + dr*sum(q2)): in the kernel the two
passes are two activation rows against the same weight tile, their float32 accumulators added before
the store. About 2^-8 of the one-pass activation error for ~2x the integer work (weights read once).

The same library holds an int8-weight op for GGUF Q8_0 (w = d*q, q int8, one fp16 d per group of 32),
`torch.ops.layerserve_q4.matmul_q8`, with the same activations: y = sum_g (d*dx) * sum_k q*qx.
API: Q8Weight, pack_q8, pack_q8_dense, quantize_q8, q8_from_gguf, unpack_q8, dequantize_q8, q8_matmul,
q8_matmul_reference, q8_error_bound.

Environment: LAYERSERVE_Q4_PATH = auto | avx512 | avx2 | plain (force a path), LAYERSERVE_KERNEL_CACHE
(cache dir, default $XDG_CACHE_HOME/layerserve/kernels or ~/.cache/layerserve/kernels), CXX (compiler,
default c++), LAYERSERVE_NO_KERNELS=1 (never build or load).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GROUP = 32  # K per scale/min group
TILE = 16  # output rows interleaved in one packed block
BLOCK_BYTES = TILE * GROUP // 2 + 4 * TILE  # 256 bytes of nibbles + 16 fp16 scales + 16 fp16 mins
Q8_BLOCK_BYTES = TILE * GROUP + 2 * TILE  # 512 int8 + 16 fp16 scales
PATHS = {"plain": 0, "avx2": 1, "avx512": 2}
_PATH_NAMES = {v: k for k, v in PATHS.items()}

_HERE = Path(__file__).parent
# One library: the matmuls, and the whole-stack decode step that calls them without the dispatcher.
_SOURCES = [_HERE / "q4_gemm.cpp", _HERE / "decode_step.cpp"]
_HEADERS = [_HERE / "q4_gemm.h"]
# No -march: the cached library may move between hosts. Vector code carries per-function target
# attributes and is dispatched at run time. -ffp-contract=off keeps the plain path's float
# arithmetic exactly what it says (the vector paths use explicit FMAs), so all paths agree bitwise.
_CXXFLAGS = ["-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-DNDEBUG",
             "-fvisibility=hidden", "-w"]

_lock = threading.Lock()
_state: dict = {"tried": False, "error": None, "library": None, "seconds": None, "built": None}
_OP = None  # torch.ops.layerserve_q4.matmul.default once loaded
_OP8 = None  # torch.ops.layerserve_q4.matmul_q8.default once loaded
_default_code = -1  # path code from LAYERSERVE_Q4_PATH, read at load


# ----------------------------------------------------------------------------- build and load

def cache_dir() -> Path:
    env = os.environ.get("LAYERSERVE_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerserve" / "kernels"


def _torch_paths() -> tuple[list[str], str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    return include_paths(), library_paths()[0]


def _build_flags() -> list[str]:
    return _CXXFLAGS + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def library_path() -> Path:
    """Where the compiled kernel for this source, these flags and this torch lives (built or not)."""
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in _SOURCES + _HEADERS), " ".join(_build_flags()).encode(), torch.__version__.encode(),
                 str(torch.version.git_version).encode(), platform.machine().encode(), torch.__file__.encode()):
        key.update(part)
        key.update(b"\0")
    tv = torch.__version__.split("+")[0]
    return cache_dir() / f"q4_gemm-torch{tv}-{key.hexdigest()[:16]}.so"


def _compile(target: Path) -> None:
    includes, libdir = _torch_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    # Link against the OpenMP runtime torch itself loaded, so at::parallel_for here runs on torch's
    # thread pool (a second libgomp would start a second team).
    gomp = sorted(glob.glob(os.path.join(libdir, "libgomp*.so*")))
    omp_link = [gomp[0]] if gomp else ["-fopenmp"]
    cmd = [os.environ.get("CXX", "c++"), *_build_flags(), *[f"-I{p}" for p in includes], *map(str, _SOURCES),
           "-o", str(tmp), f"-L{libdir}", "-lc10", "-ltorch_cpu", *omp_link, f"-Wl,-rpath,{libdir}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"cannot run the C++ compiler {cmd[0]!r}: {e}") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"compiling {', '.join(f.name for f in _SOURCES)} failed ({cmd[0]}, exit {proc.returncode}):\n" + "\n".join(tail))
    os.replace(tmp, target)  # atomic: concurrent builders each leave a complete file


def _self_check() -> None:
    """A small product on every path this CPU has, against the reference: catches a broken build."""
    g = torch.Generator().manual_seed(0)
    w = pack_dense(torch.randn(37, 96, generator=g))
    x = torch.randn(3, 96, generator=g)
    w8 = pack_q8_dense(torch.randn(37, 96, generator=g))
    for precise in (False, True):
        want, bound = _reference(x, w, precise)
        for code in torch.ops.layerserve_q4.paths():
            got = torch.ops.layerserve_q4.matmul(x, w.data, w.n, code, precise).double()
            if not bool(((got - want).abs() <= bound).all()):
                raise RuntimeError(f"self-check failed on the {_PATH_NAMES.get(code, code)} path (precise={precise})")
        want, bound = _reference_q8(x, w8, precise)
        for code in torch.ops.layerserve_q4.paths():
            got = torch.ops.layerserve_q4.matmul_q8(x, w8.data, w8.n, code, precise).double()
            if not bool(((got - want).abs() <= bound).all()):
                raise RuntimeError(f"q8 self-check failed on the {_PATH_NAMES.get(code, code)} path (precise={precise})")


def _register_fake() -> None:
    register = getattr(torch.library, "register_fake", None)
    if register is None:
        return

    def fake(x, w, n, path=-1, precise=False):
        return x.new_empty((x.shape[0], n))

    for name in ("layerserve_q4::matmul", "layerserve_q4::matmul_q8"):
        try:
            register(name)(fake)
        except Exception as e:  # already registered in this process, or an older torch
            log.debug("no fake kernel for %s: %s", name, e)


def _load() -> None:
    global _OP, _OP8, _default_code
    with _lock:
        if _state["tried"]:
            return
        _state["tried"] = True
        t0 = time.perf_counter()
        try:
            if os.environ.get("LAYERSERVE_NO_KERNELS", "") not in ("", "0"):
                raise RuntimeError("disabled by LAYERSERVE_NO_KERNELS")
            if platform.machine().lower() not in ("x86_64", "amd64"):
                raise RuntimeError(f"no kernel for {platform.machine()} (x86-64 only)")
            target = library_path()
            _state["built"] = not target.exists()
            if _state["built"]:
                log.info("compiling the int4 kernel into %s (once per torch version)", target)
                _compile(target)
            try:
                torch.ops.layerserve_q4.matmul.default  # noqa: B018 (already loaded in this process)
            except (AttributeError, RuntimeError):
                try:
                    torch.ops.load_library(str(target))
                except OSError:
                    if _state["built"]:
                        raise
                    log.warning("cached int4 kernel %s does not load; rebuilding it", target)
                    _state["built"] = True
                    _compile(target)
                    torch.ops.load_library(str(target))
            _register_fake()
            _self_check()
            _default_code = _path_code(None)
            _OP = torch.ops.layerserve_q4.matmul.default
            _OP8 = torch.ops.layerserve_q4.matmul_q8.default
            _state["library"] = str(target)
        except Exception as e:
            _state["error"] = str(e)
            log.warning("int4 kernel unavailable: %s", e)
        _state["seconds"] = time.perf_counter() - t0


def available() -> bool:
    """Whether the compiled kernel is loaded (building it on first call)."""
    _load()
    return _state["error"] is None


def unavailable_reason() -> str | None:
    _load()
    return _state["error"]


def load_info() -> dict:
    """library path, whether this process compiled it, seconds the build/load took, the error."""
    _load()
    return {k: _state[k] for k in ("library", "built", "seconds", "error")}


def cpu_paths() -> list[str]:
    """Kernel paths this CPU runs, fastest first (empty if the kernel is unavailable)."""
    if not available():
        return []
    return [_PATH_NAMES[c] for c in torch.ops.layerserve_q4.paths()]


def default_path_code() -> int:
    """The path code the ops run by default in this process (LAYERSERVE_Q4_PATH as read at load; -1 = best)."""
    _load()
    return _default_code


def _path_code(path: str | None) -> int:
    name = (path or os.environ.get("LAYERSERVE_Q4_PATH") or "auto").lower()
    if name == "auto":
        return -1
    if name not in PATHS:
        raise ValueError(f"unknown q4 kernel path {name!r} (auto, {', '.join(PATHS)})")
    return PATHS[name]


# ----------------------------------------------------------------------------- packed weights

@dataclass(frozen=True, eq=False)
class Q4Weight:
    """Packed int4 weights of an (n, k) matrix: `data` is (ceil(n/16), k/32, 320) uint8 (see q4_gemm.cpp)."""

    data: torch.Tensor
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self) -> torch.Tensor:
        return dequantize_q4(self)


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Q4Weight:
    """q (N, K) integers in 0..15, d and m (N, K/32) float (stored as fp16) -> packed weights for w = d*q + m."""
    n, k = q.shape
    if k % GROUP:
        raise ValueError(f"K={k} is not a multiple of {GROUP}")
    g = k // GROUP
    if d.shape != (n, g) or m.shape != (n, g):
        raise ValueError(f"d and m must be ({n}, {g}), got {tuple(d.shape)} and {tuple(m.shape)}")
    nt = -(-n // TILE)
    pad = nt * TILE - n
    q = q.to(torch.uint8)
    if q.numel() and int(q.max()) > 15:
        raise ValueError("q must lie in 0..15")
    d16, m16 = d.to(torch.float16), m.to(torch.float16)
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        d16 = torch.cat([d16, d16.new_zeros(pad, g)])
        m16 = torch.cat([m16, m16.new_zeros(pad, g)])
    # k = 32g + 8c + 4h + j; byte (t, g, c, r, j) = q[.., h=0, j] | q[.., h=1, j] << 4
    qv = q.view(nt, TILE, g, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # (t, g, c, r, j, h)
    nib = (qv[..., 0] | (qv[..., 1] << 4)).reshape(nt, g, TILE * GROUP // 2)
    scales = d16.view(nt, TILE, g).transpose(1, 2).contiguous().view(torch.uint8)  # (t, g, 32)
    mins = m16.view(nt, TILE, g).transpose(1, 2).contiguous().view(torch.uint8)
    return Q4Weight(torch.cat([nib, scales, mins], dim=-1).contiguous(), n, k)


def unpack_q4(w: Q4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of pack_q4: q (N, K) uint8, d and m (N, K/32) float32 (the fp16 values)."""
    nt, g, _ = w.data.shape
    nib = w.data[..., :256].reshape(nt, g, 4, TILE, 4)  # (t, g, c, r, j)
    q = torch.stack([nib & 0x0F, nib >> 4], dim=-1)  # (t, g, c, r, j, h)
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(nt * TILE, w.k)[: w.n]
    d = w.data[..., 256:288].contiguous().view(torch.float16).transpose(1, 2).reshape(nt * TILE, g)[: w.n]
    m = w.data[..., 288:320].contiguous().view(torch.float16).transpose(1, 2).reshape(nt * TILE, g)[: w.n]
    return q.contiguous(), d.float(), m.float()


def dequantize_q4(w: Q4Weight) -> torch.Tensor:
    """(N, K) float32: the weights the kernel multiplies by."""
    q, d, m = unpack_q4(w)
    n, k = q.shape
    return (q.float().view(n, k // GROUP, GROUP) * d.unsqueeze(-1) + m.unsqueeze(-1)).view(n, k)


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (N, K) float -> (q, d, m) by min/max per group of 32 (as linear.quantize_int4), with d
    and m rounded to fp16 first so q is fitted to the stored scales."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"K={k} is not a multiple of {GROUP}")
    w = weight.float().view(n, k // GROUP, GROUP)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = ((w - m.unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, 15)
    q = torch.where((d > 0).unsqueeze(-1), q, torch.zeros_like(q))
    return q.to(torch.uint8).view(n, k), d, m


def pack_dense(weight: torch.Tensor) -> Q4Weight:
    """Quantize a dense float weight (min/max per group of 32) and pack it."""
    return pack_q4(*quantize_q4(weight))


GGML_Q4_0, GGML_Q4_1 = 2, 3


def from_gguf(raw, ggml_type: int, shape: tuple[int, ...]) -> Q4Weight:
    """GGUF Q4_0 / Q4_1 tensor bytes (ggml shape (K, N)) -> packed weights, without dequantizing."""
    k, n = shape[0], 1
    for dim in shape[1:]:
        n *= dim
    data = raw if isinstance(raw, torch.Tensor) else torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if ggml_type == GGML_Q4_0:
        b = data.reshape(-1, 18)
        d = b[:, :2].contiguous().view(torch.float16).float()
        m = -8 * d
        qs = b[:, 2:]
    elif ggml_type == GGML_Q4_1:
        b = data.reshape(-1, 20)
        d = b[:, :2].contiguous().view(torch.float16).float()
        m = b[:, 2:4].contiguous().view(torch.float16).float()
        qs = b[:, 4:]
    else:
        raise ValueError(f"ggml type {ggml_type} is not Q4_0/Q4_1")
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1)  # (blocks, 32): low nibbles are elements 0..15
    g = k // GROUP
    return pack_q4(q.reshape(n, k), d.reshape(n, g), m.reshape(n, g))


# ----------------------------------------------------------------------------- matmul

def _require_op():
    if not available():
        raise RuntimeError(f"int4 kernel unavailable: {_state['error']}")
    return _OP


def q4_matmul(x: torch.Tensor, w: Q4Weight, path: str | None = None, precise: bool = False) -> torch.Tensor:
    """x (..., K) float -> (..., N) float32 with the compiled kernel (`path`: None = LAYERSERVE_Q4_PATH
    as read at load, else auto; or auto, avx512, avx2, plain). precise: also multiply the activations'
    quantization residual (a second int8 pass, see the module doc)."""
    op = _OP or _require_op()
    code = _default_code if path is None else _path_code(path)
    if x.dtype != torch.float32:
        x = x.float()
    if x.dim() == 2:
        return op(x, w.data, w.n, code, precise)
    return op(x.reshape(-1, w.k), w.data, w.n, code, precise).view(*x.shape[:-1], w.n)


def quantize_activations(x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's own activation quantization (for tests): (q int8 (M, K), d (M, K/32), s (M, K/32))."""
    if not available():
        raise RuntimeError(f"int4 kernel unavailable: {_state['error']}")
    return torch.ops.layerserve_q4.quantize_rows(x.float(), _path_code(path))


def quantize_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row and group of 32: d = max|x| / 127, q = round-half-even(x * (1/d)), s = d * sum(q)."""
    mrows, k = x.shape
    xg = x.float().reshape(mrows, k // GROUP, GROUP)
    amax = xg.abs().amax(dim=-1)
    d = amax / torch.full_like(amax, 127.0)
    inv = torch.where(d > 0, torch.ones_like(d) / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(xg * inv.unsqueeze(-1)).clamp(-127, 127)
    s = d * q.sum(dim=-1)
    return q.to(torch.int8).view(mrows, k), d, s


def quantize_activations_precise_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """precise mode's activations: (q, d, s) with 2M rows, row 2i = x[i] quantized as
    quantize_activations_reference, row 2i+1 = its residual x - d*q (float32) quantized the same way."""
    mrows, k = x.shape
    q1, d1, s1 = quantize_activations_reference(x)
    xg = x.float().reshape(mrows, k // GROUP, GROUP)
    r = (xg - d1.unsqueeze(-1) * q1.float().view(mrows, k // GROUP, GROUP)).view(mrows, k)
    q2, d2, s2 = quantize_activations_reference(r)
    return (torch.stack([q1, q2], dim=1).view(2 * mrows, k), torch.stack([d1, d2], dim=1).view(2 * mrows, -1),
            torch.stack([s1, s2], dim=1).view(2 * mrows, -1))


def _acts(x: torch.Tensor, k: int, precise: bool):
    x = x.reshape(-1, k)
    return quantize_activations_precise_reference(x) if precise else quantize_activations_reference(x)


def _fold(y: torch.Tensor, mag: torch.Tensor, g: int, precise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bound) from per-activation-row exact sums; precise adds the two passes' rows, and the
    kernel's one float32 add of the two accumulators to the bound."""
    if not precise:
        return y, (2 * g + 2) * 2.0 ** -24 * mag + 1e-30
    y = y.view(-1, 2, y.shape[-1]).sum(dim=1)
    mag = mag.view(-1, 2, mag.shape[-1]).sum(dim=1)
    return y, (2 * g + 4) * 2.0 ** -24 * mag + 1e-30


def _reference(x: torch.Tensor, w: Q4Weight, precise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bound) in float64: y is the kernel's arithmetic with an exact sum over groups; the kernel's
    float32 accumulation may differ from it by at most `bound`."""
    q, dw, mw = unpack_q4(w)
    xq, dx, sx = _acts(x, w.k, precise)
    mrows, g = dx.shape
    qx = xq.double().view(mrows, g, GROUP).transpose(0, 1)  # (G, M, 32)
    qw = q.double().view(w.n, g, GROUP).permute(1, 2, 0)  # (G, 32, N)
    isum = torch.bmm(qx, qw).permute(1, 2, 0)  # (M, N, G), exact
    t = (dw.unsqueeze(0) * dx.unsqueeze(1)).double()  # float32 product, as the kernel rounds it
    terms_a = isum * t
    terms_b = (mw.unsqueeze(0).double() * sx.unsqueeze(1).double())
    y = (terms_a + terms_b).sum(dim=-1)
    mag = (terms_a.abs() + terms_b.abs()).sum(dim=-1)
    return _fold(y, mag, g, precise)


def q4_matmul_reference(x: torch.Tensor, w: Q4Weight, precise: bool = False) -> torch.Tensor:
    """Pure torch, the same arithmetic as the kernel (int8 activation quantization included): (M, N) float32."""
    y, _ = _reference(x, w, precise)
    return y.float().view(*x.shape[:-1], w.n)


def q4_error_bound(x: torch.Tensor, w: Q4Weight, precise: bool = False) -> torch.Tensor:
    """Per element, how far the kernel's float32 result may lie from q4_matmul_reference's exact sum."""
    return _reference(x, w, precise)[1].view(*x.shape[:-1], w.n)



# ----------------------------------------------------------------------------- int8 weights (GGUF Q8_0)

@dataclass(frozen=True, eq=False)
class Q8Weight:
    """Packed int8 weights of an (n, k) matrix, w = d*q: `data` is (ceil(n/16), k/32, 544) uint8 (see q4_gemm.cpp)."""

    data: torch.Tensor
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self) -> torch.Tensor:
        return dequantize_q8(self)


def pack_q8(q: torch.Tensor, d: torch.Tensor) -> Q8Weight:
    """q (N, K) int8 (-128..127), d (N, K/32) float (stored as fp16) -> packed weights for w = d*q."""
    n, k = q.shape
    if k % GROUP:
        raise ValueError(f"K={k} is not a multiple of {GROUP}")
    g = k // GROUP
    if d.shape != (n, g):
        raise ValueError(f"d must be ({n}, {g}), got {tuple(d.shape)}")
    if q.dtype != torch.int8:
        if q.numel() and (int(q.min()) < -128 or int(q.max()) > 127):
            raise ValueError("q must lie in -128..127")
        q = q.to(torch.int8)
    nt = -(-n // TILE)
    pad = nt * TILE - n
    d16 = d.to(torch.float16)
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        d16 = torch.cat([d16, d16.new_zeros(pad, g)])
    # k = 32g + 4c + j; byte (t, g, c, r, j) = q[16t + r, k]
    qv = q.view(torch.uint8).view(nt, TILE, g, 8, 4).permute(0, 2, 3, 1, 4).reshape(nt, g, TILE * GROUP)
    scales = d16.view(nt, TILE, g).transpose(1, 2).contiguous().view(torch.uint8)  # (t, g, 32)
    return Q8Weight(torch.cat([qv, scales], dim=-1).contiguous(), n, k)


def unpack_q8(w: Q8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_q8: q (N, K) int8, d (N, K/32) float32 (the fp16 values)."""
    nt, g, _ = w.data.shape
    qb = w.data[..., : TILE * GROUP].reshape(nt, g, 8, TILE, 4)  # (t, g, c, r, j)
    q = qb.permute(0, 3, 1, 2, 4).reshape(nt * TILE, w.k)[: w.n].contiguous().view(torch.int8)
    d = w.data[..., TILE * GROUP:].contiguous().view(torch.float16).transpose(1, 2).reshape(nt * TILE, g)[: w.n]
    return q, d.float()


def dequantize_q8(w: Q8Weight) -> torch.Tensor:
    """(N, K) float32: the weights the kernel multiplies by."""
    q, d = unpack_q8(w)
    n, k = q.shape
    return (q.float().view(n, k // GROUP, GROUP) * d.unsqueeze(-1)).view(n, k)


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (N, K) float -> (q int8, d) by absmax per group of 32 (d = amax/127, rounded to fp16
    first, q = round(w/d) clamped to -127..127 so it is fitted to the stored scale)."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"K={k} is not a multiple of {GROUP}")
    w = weight.float().view(n, k // GROUP, GROUP)
    d = (w.abs().amax(dim=-1) / 127).half().float()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = (w / safe.unsqueeze(-1)).round().clamp(-127, 127)
    q = torch.where((d > 0).unsqueeze(-1), q, torch.zeros_like(q))
    return q.to(torch.int8).view(n, k), d


def pack_q8_dense(weight: torch.Tensor) -> Q8Weight:
    """Quantize a dense float weight (absmax per group of 32) and pack it."""
    return pack_q8(*quantize_q8(weight))


GGML_Q8_0 = 8


def q8_from_gguf(raw, shape: tuple[int, ...]) -> Q8Weight:
    """GGUF Q8_0 tensor bytes (type 8; ggml shape (K, N); blocks of fp16 d + 32 int8) -> packed
    weights, without dequantizing."""
    k, n = shape[0], 1
    for dim in shape[1:]:
        n *= dim
    data = raw if isinstance(raw, torch.Tensor) else torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    b = data.reshape(-1, 34)
    d = b[:, :2].contiguous().view(torch.float16)
    q = b[:, 2:].contiguous().view(torch.int8)
    g = k // GROUP
    return pack_q8(q.reshape(n, k), d.reshape(n, g))


def q8_matmul(x: torch.Tensor, w: Q8Weight, path: str | None = None, precise: bool = False) -> torch.Tensor:
    """x (..., K) float -> (..., N) float32 with the compiled int8-weight kernel (`path`, `precise` as q4_matmul)."""
    op = _OP8
    if op is None:
        _require_op()
        op = _OP8
    code = _default_code if path is None else _path_code(path)
    if x.dtype != torch.float32:
        x = x.float()
    if x.dim() == 2:
        return op(x, w.data, w.n, code, precise)
    return op(x.reshape(-1, w.k), w.data, w.n, code, precise).view(*x.shape[:-1], w.n)


def _reference_q8(x: torch.Tensor, w: Q8Weight, precise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bound) in float64, as _reference: exact integer group sums times the float32 d*dx."""
    q, dw = unpack_q8(w)
    xq, dx, _ = _acts(x, w.k, precise)
    mrows, g = dx.shape
    qx = xq.double().view(mrows, g, GROUP).transpose(0, 1)  # (G, M, 32)
    qw = q.double().view(w.n, g, GROUP).permute(1, 2, 0)  # (G, 32, N)
    isum = torch.bmm(qx, qw).permute(1, 2, 0)  # (M, N, G), exact
    t = (dw.unsqueeze(0) * dx.unsqueeze(1)).double()  # float32 product, as the kernel rounds it
    terms = isum * t
    return _fold(terms.sum(dim=-1), terms.abs().sum(dim=-1), g, precise)


def q8_matmul_reference(x: torch.Tensor, w: Q8Weight, precise: bool = False) -> torch.Tensor:
    """Pure torch, the same arithmetic as the q8 kernel (int8 activation quantization included): float32."""
    y, _ = _reference_q8(x, w, precise)
    return y.float().view(*x.shape[:-1], w.n)


def q8_error_bound(x: torch.Tensor, w: Q8Weight, precise: bool = False) -> torch.Tensor:
    """Per element, how far the q8 kernel's float32 result may lie from q8_matmul_reference's exact sum."""
    return _reference_q8(x, w, precise)[1].view(*x.shape[:-1], w.n)
