"""The int4 x int8 CPU kernel (layerserve/kernels): every path this CPU has equals the pure-torch
reference of the same arithmetic, the paths agree bitwise, and the result is close to the dense
float matmul of the dequantized weights (within the bound int8 activations allow)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from layerserve.kernels import q4
from layerserve.model.gguf_tensors import decode_tensor

_CAN_BUILD = (platform.machine().lower() in ("x86_64", "amd64") and shutil.which(os.environ.get("CXX", "c++"))
              and os.environ.get("LAYERSERVE_NO_KERNELS", "") in ("", "0"))
# Where a build is possible it must work: a broken kernel fails here rather than skipping.
needs_kernel = pytest.mark.skipif(not _CAN_BUILD, reason="no C++ compiler / not x86-64 / kernels disabled")

ALL_PATHS = ["avx512", "avx2", "plain"]


def _paths() -> list[str]:
    assert q4.available(), q4.unavailable_reason()
    return q4.cpu_paths()


def _path_or_skip(path: str) -> None:
    if path not in _paths():
        pytest.skip(f"this CPU has no {path} path")


def _weights(n: int, k: int, seed: int) -> q4.Q4Weight:
    g = torch.Generator().manual_seed(seed)
    return q4.pack_dense(torch.randn(n, k, generator=g) * 0.05)


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, :32] *= 30  # groups of very different magnitude, as real activations have
    if m > 2:
        x[1, 32:64] = 0  # an all-zero group: dx = 0
    return x


# ----------------------------------------------------------------------------- packing (no kernel needed)

def test_pack_roundtrip_odd_n():
    g = torch.Generator().manual_seed(0)
    n, k = 37, 96
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    d = torch.rand(n, k // 32, generator=g).half().float()
    m = -torch.rand(n, k // 32, generator=g).half().float()
    w = q4.pack_q4(q, d, m)
    assert w.data.shape == (3, 3, 320) and w.n == n and w.k == k
    q2, d2, m2 = q4.unpack_q4(w)
    assert torch.equal(q2, q) and torch.equal(d2, d) and torch.equal(m2, m)
    want = (q.float().view(n, 3, 32) * d[..., None] + m[..., None]).view(n, k)
    assert torch.equal(q4.dequantize_q4(w), want)


def test_quantize_dense_within_half_a_step():
    w = torch.randn(50, 128) * 0.1
    q, d, m = q4.quantize_q4(w)
    deq = (q.float().view(50, 4, 32) * d[..., None] + m[..., None]).view(50, 128)
    step = d.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step * 0.5 + 1e-3 * step + 1e-6).all()


@pytest.mark.parametrize("ggml_type", [q4.GGML_Q4_0, q4.GGML_Q4_1])
def test_from_gguf_blocks_match_the_gguf_decoder(ggml_type):
    g = torch.Generator().manual_seed(1)
    n, k = 20, 64
    q = torch.randint(0, 16, (n * k // 32, 32), dtype=torch.uint8, generator=g)
    qs = (q[:, :16] | (q[:, 16:] << 4)).numpy()
    d = (torch.rand(n * k // 32, 1, generator=g) * 0.02).half().numpy().view(np.uint8)
    if ggml_type == q4.GGML_Q4_0:
        raw = np.concatenate([d, qs], axis=1)
    else:
        mins = (-torch.rand(n * k // 32, 1, generator=g) * 0.1).half().numpy().view(np.uint8)
        raw = np.concatenate([d, mins, qs], axis=1)
    raw = np.ascontiguousarray(raw).reshape(-1)
    w = q4.from_gguf(torch.from_numpy(raw.copy()), ggml_type, (k, n))
    assert torch.equal(q4.dequantize_q4(w), decode_tensor(raw, ggml_type, (k, n)))


# ----------------------------------------------------------------------------- the compiled kernel

@needs_kernel
def test_kernel_builds_and_reports_paths():
    paths = _paths()
    assert paths[-1] == "plain"
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if "avx512_vnni" in flags and "avx512bw" in flags:
        assert paths[0] == "avx512"
    if "avx2" in flags and "fma" in flags and "f16c" in flags:
        assert "avx2" in paths


@needs_kernel
@pytest.mark.parametrize("path", ALL_PATHS)
def test_activation_quantization_is_the_reference_bitwise(path):
    _path_or_skip(path)
    x = _x(7, 1536, 2)
    # a group with d = 1 exactly: x/d lands on ties, which round to even (2.5 -> 2, -0.5 -> 0)
    x[2, 96:128] = torch.tensor([127.0, 2.5, 3.5, -2.5, 0.5, -0.5, 1.5, -1.5] * 4)
    got = q4.quantize_activations(x, path)
    want = q4.quantize_activations_reference(x)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


# (M, N, K): every M in 1..16, odd and tiny N (partial last tile), K from one group to the down proj's
SHAPES = [(m, [1, 15, 17, 33, 100, 961][m % 6], [32, 64, 576, 1536][m % 4]) for m in range(1, 17)]


@needs_kernel
@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_equals_reference(path, m, n, k):
    _path_or_skip(path)
    w, x = _weights(n, k, seed=m), _x(m, k, seed=100 + m)
    y = q4.q4_matmul(x, w, path)
    assert y.shape == (m, n) and y.dtype == torch.float32
    ref = q4.q4_matmul_reference(x, w).double()
    bound = q4.q4_error_bound(x, w)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 3072, 576), (5, 961, 576), (16, 576, 1536), (40, 49, 96)])
def test_paths_agree_bitwise(m, n, k):
    w, x = _weights(n, k, seed=3), _x(m, k, seed=4)
    results = {p: q4.q4_matmul(x, w, p) for p in _paths()}
    first = next(iter(results.values()))
    for p, y in results.items():
        assert torch.equal(y, first), p


@needs_kernel
@pytest.mark.parametrize("m", [1, 4, 16])
def test_close_to_dense_matmul_of_dequantized_weights(m):
    n, k = 300, 576
    w, x = _weights(n, k, seed=5), torch.randn(m, k, generator=torch.Generator().manual_seed(6))
    wd = q4.dequantize_q4(w).double()
    dense = x.double() @ wd.T
    y = q4.q4_matmul(x, w).double()
    # int8 activations: each element is off by at most half a step dx of its group
    _, dx, _ = q4.quantize_activations_reference(x)
    step = dx.double().repeat_interleave(32, dim=1)  # (M, K)
    bound = (step / 2) @ wd.abs().T + q4.q4_error_bound(x, w) + 1e-6
    assert ((y - dense).abs() <= bound).all()
    assert (y - dense).norm() / dense.norm() < 0.02


@needs_kernel
def test_leading_dims_and_dtypes():
    w = _weights(40, 64, seed=7)
    x = torch.randn(2, 3, 64)
    y = q4.q4_matmul(x, w)
    assert y.shape == (2, 3, 40)
    assert torch.equal(y.view(6, 40), q4.q4_matmul(x.view(6, 64), w))
    assert q4.q4_matmul(x.bfloat16(), w).dtype == torch.float32
    assert q4.q4_matmul(torch.randn(0, 64), w).shape == (0, 40)


@needs_kernel
def test_bad_inputs_raise():
    w = _weights(40, 64, seed=8)
    with pytest.raises(RuntimeError, match="K="):
        q4.q4_matmul(torch.randn(2, 96), w)
    with pytest.raises(ValueError, match="unknown q4 kernel path"):
        q4.q4_matmul(torch.randn(2, 64), w, "sse9")
    if "avx512" not in _paths():
        with pytest.raises(RuntimeError, match="does not support"):
            q4.q4_matmul(torch.randn(2, 64), w, "avx512")


@needs_kernel
def test_runs_on_torchs_own_thread_pool():
    _paths()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.ops.layerserve_q4.threads_seen() == 1
        if (os.cpu_count() or 1) >= 2:
            torch.set_num_threads(2)
            assert torch.ops.layerserve_q4.threads_seen() == 2
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_fake_tensor_shapes_for_torch_compile():
    _paths()
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = _weights(33, 64, seed=9)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = torch.ops.layerserve_q4.matmul(mode.from_tensor(torch.randn(3, 64)), mode.from_tensor(w.data), 33)
    assert tuple(y.shape) == (3, 33)


def _probe(env: dict) -> str:
    code = ("import time; t = time.perf_counter(); from layerserve.kernels import q4; ok = q4.available(); "
            "print(ok, q4.load_info()['built'], round(q4.load_info()['seconds'], 3)); print(q4.unavailable_reason())")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_kernel
def test_warm_start_loads_from_the_cache_in_well_under_a_second():
    _paths()  # built (or found) by this process
    ok, built, seconds = _probe({}).splitlines()[0].split()
    assert ok == "True" and built == "False" and float(seconds) < 1.0


def test_failed_build_falls_back_cleanly(tmp_path):
    out = _probe({"LAYERSERVE_KERNEL_CACHE": str(tmp_path), "CXX": "/bin/false"}).splitlines()
    assert out[0].startswith("False")
    assert "false" in out[1] or "x86-64 only" in out[1] or "disabled" in out[1]
    assert not list(tmp_path.glob("*.so"))


# ----------------------------------------------------------------------------- int8 weights (Q8_0), the head's kernel

def _weights_q8(n: int, k: int, seed: int) -> q4.Q8Weight:
    g = torch.Generator().manual_seed(seed)
    return q4.pack_q8_dense(torch.randn(n, k, generator=g) * 0.05)


def test_pack_q8_roundtrip_odd_n_and_full_int8_range():
    g = torch.Generator().manual_seed(10)
    n, k = 37, 96
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    q[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    d = torch.rand(n, k // 32, generator=g).half().float()
    w = q4.pack_q8(q, d)
    assert w.data.shape == (3, 3, 544) and w.n == n and w.k == k and w.nbytes == 3 * 3 * 544
    q2, d2 = q4.unpack_q8(w)
    assert q2.dtype == torch.int8 and torch.equal(q2, q) and torch.equal(d2, d)
    assert torch.equal(q4.dequantize_q8(w), (q.float().view(n, 3, 32) * d[..., None]).view(n, k))


def test_quantize_q8_dense_within_half_a_step():
    w = torch.randn(50, 128) * 0.1
    w[3, :32] = 0  # an all-zero group
    q, d = q4.quantize_q8(w)
    assert d.dtype == torch.float32 and torch.equal(d, d.half().float())
    deq = (q.float().view(50, 4, 32) * d[..., None]).view(50, 128)
    step = d.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step * 0.5 + 1e-3 * step + 1e-7).all()
    assert torch.equal(q4.dequantize_q8(q4.pack_q8_dense(w)), deq)


def test_q8_from_gguf_blocks_match_the_gguf_decoder():
    g = torch.Generator().manual_seed(11)
    n, k = 20, 64
    qs = torch.randint(-128, 128, (n * k // 32, 32), dtype=torch.int8, generator=g).numpy().view(np.uint8)
    d = (torch.rand(n * k // 32, 1, generator=g) * 0.02).half().numpy().view(np.uint8)
    raw = np.ascontiguousarray(np.concatenate([d, qs], axis=1)).reshape(-1)
    w = q4.q8_from_gguf(torch.from_numpy(raw.copy()), (k, n))
    assert torch.equal(q4.dequantize_q8(w), decode_tensor(raw, q4.GGML_Q8_0, (k, n)))
    assert torch.equal(q4.dequantize_q8(q4.q8_from_gguf(raw.tobytes(), (k, n))), q4.dequantize_q8(w))


@needs_kernel
@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_q8_kernel_equals_reference(path, m, n, k):
    _path_or_skip(path)
    w, x = _weights_q8(n, k, seed=m), _x(m, k, seed=200 + m)
    y = q4.q8_matmul(x, w, path)
    assert y.shape == (m, n) and y.dtype == torch.float32
    ref = q4.q8_matmul_reference(x, w).double()
    bound = q4.q8_error_bound(x, w)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


@needs_kernel
@pytest.mark.parametrize("path", ALL_PATHS)
def test_q8_kernel_extreme_int8_weights(path):
    # -128 and 127 weights against +-127 activations: the bias (avx512) and sign (avx2) tricks at their limits
    _path_or_skip(path)
    n, k = 33, 64
    q = torch.full((n, k), -128, dtype=torch.int8)
    q[::2] = 127
    q[5, ::3] = 0
    w = q4.pack_q8(q, torch.full((n, k // 32), 0.5))
    x = torch.ones(4, k) * (127 / 64)  # dx = 1/64 exactly, qx = +-127: every float step is exact
    x[1] *= -1
    x[2, ::2] *= -1
    x[3, 1::4] = 0
    y = q4.q8_matmul(x, w, path)
    assert torch.equal(y, q4.q8_matmul_reference(x, w))
    assert torch.equal(y.double(), x.double() @ q4.dequantize_q8(w).double().T)


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 3072, 576), (5, 961, 576), (16, 576, 1536), (40, 49, 96)])
def test_q8_paths_agree_bitwise(m, n, k):
    w, x = _weights_q8(n, k, seed=13), _x(m, k, seed=14)
    results = {p: q4.q8_matmul(x, w, p) for p in _paths()}
    first = next(iter(results.values()))
    for p, y in results.items():
        assert torch.equal(y, first), p


@needs_kernel
@pytest.mark.parametrize("m", [1, 4, 16])
def test_q8_close_to_dense_matmul(m):
    n, k = 300, 576
    dense_w = torch.randn(n, k, generator=torch.Generator().manual_seed(15)) * 0.05
    w, x = q4.pack_q8_dense(dense_w), torch.randn(m, k, generator=torch.Generator().manual_seed(16))
    wd = q4.dequantize_q8(w).double()
    dense = x.double() @ wd.T
    y = q4.q8_matmul(x, w).double()
    _, dx, _ = q4.quantize_activations_reference(x)
    step = dx.double().repeat_interleave(32, dim=1)
    bound = (step / 2) @ wd.abs().T + q4.q8_error_bound(x, w) + 1e-6
    assert ((y - dense).abs() <= bound).all()
    assert (y - dense).norm() / dense.norm() < 0.01
    # and against the float32 weights themselves: int8 weights are far closer than int4
    exact = x.double() @ dense_w.double().T
    y4 = q4.q4_matmul(x, q4.pack_dense(dense_w)).double()
    assert (y - exact).norm() < 0.3 * (y4 - exact).norm()


@needs_kernel
def test_q8_leading_dims_dtypes_bad_inputs_and_fake():
    w = _weights_q8(40, 64, seed=17)
    x = torch.randn(2, 3, 64)
    y = q4.q8_matmul(x, w)
    assert y.shape == (2, 3, 40)
    assert torch.equal(y.view(6, 40), q4.q8_matmul(x.view(6, 64), w))
    assert q4.q8_matmul(x.bfloat16(), w).dtype == torch.float32
    assert q4.q8_matmul(torch.randn(0, 64), w).shape == (0, 40)
    with pytest.raises(RuntimeError, match="K="):
        q4.q8_matmul(torch.randn(2, 96), w)
    with pytest.raises(RuntimeError, match="544"):
        torch.ops.layerserve_q4.matmul_q8(torch.randn(2, 64), _weights(40, 64, seed=1).data, 40)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yf = torch.ops.layerserve_q4.matmul_q8(mode.from_tensor(torch.randn(3, 64)), mode.from_tensor(w.data), 40)
    assert tuple(yf.shape) == (3, 40)


# ----------------------------------------------------------------------------- precise mode (residual second pass)

def _matmul_and_ref(kind: str):
    if kind == "q4":
        return _weights, q4.q4_matmul, q4.q4_matmul_reference, q4.q4_error_bound
    return _weights_q8, q4.q8_matmul, q4.q8_matmul_reference, q4.q8_error_bound


def test_precise_activation_reference_reconstructs_x():
    x = _x(5, 576, seed=30)
    q, d, s = q4.quantize_activations_precise_reference(x)
    assert q.shape == (10, 576) and d.shape == (10, 18) and s.shape == (10, 18)
    q1, d1, s1 = q4.quantize_activations_reference(x)
    assert torch.equal(q[0::2], q1) and torch.equal(d[0::2], d1) and torch.equal(s[0::2], s1)
    deq = (q.float().view(10, 18, 32) * d.unsqueeze(-1)).view(5, 2, 576).sum(1)
    one = (q1.float().view(5, 18, 32) * d1.unsqueeze(-1)).view(5, 576)
    assert (deq - x).abs().max() < (one - x).abs().max() / 50


@needs_kernel
@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_precise_kernel_equals_reference(kind, path, m, n, k):
    _path_or_skip(path)
    make_w, mm, ref_fn, bound_fn = _matmul_and_ref(kind)
    w, x = make_w(n, k, seed=m), _x(m, k, seed=300 + m)
    y = mm(x, w, path, precise=True)
    assert y.shape == (m, n) and y.dtype == torch.float32
    ref = ref_fn(x, w, precise=True).double()
    bound = bound_fn(x, w, precise=True)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"
    # the one-pass result is a different (coarser) number
    assert not torch.equal(y, mm(x, w, path))


@needs_kernel
@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("m,n,k", [(1, 3072, 576), (5, 961, 576), (16, 576, 1536), (40, 49, 96)])
def test_precise_paths_agree_bitwise(kind, m, n, k):
    make_w, mm, _, _ = _matmul_and_ref(kind)
    w, x = make_w(n, k, seed=23), _x(m, k, seed=24)
    results = {p: mm(x, w, p, precise=True) for p in _paths()}
    first = next(iter(results.values()))
    for p, y in results.items():
        assert torch.equal(y, first), p


@needs_kernel
@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_precise_much_closer_to_dense_than_one_pass(kind, m):
    make_w, mm, _, _ = _matmul_and_ref(kind)
    n, k = 300, 576
    w, x = make_w(n, k, seed=25), torch.randn(m, k, generator=torch.Generator().manual_seed(26))
    dense = x.double() @ w.dequantize().double().T
    e1 = (mm(x, w).double() - dense).norm()
    e2 = (mm(x, w, precise=True).double() - dense).norm()
    assert e2 < e1 / 20, (e1, e2)


@needs_kernel
def test_precise_leading_dims_and_fake():
    w, w8 = _weights(40, 64, seed=27), _weights_q8(40, 64, seed=28)
    x = torch.randn(2, 3, 64)
    for mm, ww in ((q4.q4_matmul, w), (q4.q8_matmul, w8)):
        y = mm(x, ww, precise=True)
        assert y.shape == (2, 3, 40)
        assert torch.equal(y.view(6, 40), mm(x.view(6, 64), ww, precise=True))
        assert mm(torch.randn(0, 64), ww, precise=True).shape == (0, 40)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for op, ww in ((torch.ops.layerserve_q4.matmul, w), (torch.ops.layerserve_q4.matmul_q8, w8)):
            yf = op(mode.from_tensor(torch.randn(3, 64)), mode.from_tensor(ww.data), 40, -1, True)
            assert tuple(yf.shape) == (3, 40)
