// One forward step of a Llama-family model over a few rows, every layer in one call.
//
// The eager step (layerserve/model/llama.py) runs ~15 torch ops per layer, ~450 per token for a
// 30-layer model; at ~20 us of Python and dispatch each that was 9 ms of a 14.6 ms token, next to
// 5.4 ms of matmuls. Here the whole stack runs in C++: the matmuls call q4_gemm.cpp directly (or
// at::linear for dense weights), and RMSNorm, RoPE, the KV write, attention, SiLU and the residuals
// are loops over the step's few rows. Same arithmetic as the eager step up to float32 rounding
// order (tests/model/test_decode_step.py holds it to the eager step).
//
// Rows are flattened tokens of any sequences: row t sits at positions[t], writes its K/V to
// slot_mapping[t], and attends to the first row_len[t] slots of ctx_slots[row_seq[t]]. So a batch
// of decodes (one row per sequence) and a short run of rows of one sequence (a speculative draft
// being verified, a short prompt chunk: row j sees the rows before it) are the same call.
//
// Per layer, `tensors` holds 9 entries (undefined where the model has none), then the final norm:
//   ln1, qkv weight, qkv bias?, o weight, q_norm?, k_norm?, ln2, gate_up weight, down weight
// and `linears` 8 ints per layer, (kind, out features) for qkv, o, gate_up, down, kind 0 = packed
// int4 (matmul_q4), 1 = packed int8 (matmul_q8), 2 = dense (at::linear in the weight's dtype).
// dims = [layers, heads, kv heads, head dim, qk_norm, precise].

#include "q4_gemm.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t PER_LAYER = 9;

// ---------------------------------------------------------------- vector helpers
// Attention's dot products and weighted sums, softmax's exponentials and SiLU, in AVX2+FMA (every
// host with our int4 kernel's vector paths) or plain C++.

struct Ops {
  float (*dot)(const float*, const float*, int64_t);
  void (*axpy)(float*, float, const float*, int64_t);  // y += a x
  float (*exp_shift)(float*, int64_t, float);          // x = exp(x - m) in place, returns the sum
  void (*silu_mul)(const float*, const float*, float*, int64_t);  // out = silu(g) * u
};

float dot_plain(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_plain(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

float exp_shift_plain(float* x, int64_t n, float m) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

void silu_mul_plain(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x in [-87.3, 88.3] (clamped): x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for
// exp(r) (Cephes' expf coefficients, ~1 ulp), times 2^n built in the exponent bits.
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum_avx2(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float* y, float a, const float* x, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

__attribute__((target("avx2,fma"))) float exp_shift_avx2(float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float s = hsum_avx2(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

__attribute__((target("avx2,fma"))) void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vg = _mm256_loadu_ps(g + i);
    const __m256 den = _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(zero, vg)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(vg, den), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

Ops ops_for(int64_t path) {
  if (path >= layerserve_q4::PATH_AVX2) return {dot_avx2, axpy_avx2, exp_shift_avx2, silu_mul_avx2};
  return {dot_plain, axpy_plain, exp_shift_plain, silu_mul_plain};
}

// ---------------------------------------------------------------- row operations

// y = x / sqrt(mean(x^2) + eps) * w (the sum of squares in double)
void rms_norm(const float* x, const float* w, float* y, int64_t n, double eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += (double)x[i] * x[i];
  const float r = (float)(1.0 / std::sqrt(ss / (double)n + eps));
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// Rotate-half RoPE of `heads` consecutive head vectors, with this position's cos/sin rows.
void rope(float* v, const float* cos, const float* sin, int64_t heads, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* x = v + h * hd;
    for (int64_t j = 0; j < half; ++j) {
      const float a = x[j], b = x[j + half];
      x[j] = a * cos[j] - b * sin[j];
      x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
  }
}

struct Linear {
  int64_t kind, n;
  const at::Tensor* w;
};

at::Tensor linear(const at::Tensor& x, const Linear& l, int64_t path, bool precise) {
  switch (l.kind) {
    case 0: return layerserve_q4::matmul_q4(x, *l.w, l.n, path, precise);
    case 1: return layerserve_q4::matmul_q8(x, *l.w, l.n, path, precise);
    default: return at::linear(x.to(l.w->scalar_type()), *l.w).to(at::kFloat).contiguous();
  }
}

struct Attention {
  const float* q;  // row t's query heads at q + t * q_stride, after RoPE
  int64_t q_stride;
  const float* kc;  // (S, nkv, hd) this layer's cache
  const float* vc;
  const int64_t* ctx_slots;
  int64_t ctx_stride;
  const int64_t* row_seq;
  const int64_t* row_len;
  float* out;  // (T, nh * hd)
  int64_t nh, nkv, hd;
  float scale;
};

// Row t, the query heads of kv head g: each K and V row is read once for all of them.
void attend(const Attention& a, const Ops& ops, int64_t t, int64_t g, std::vector<float>& scores) {
  const int64_t per = a.nh / a.nkv, len = a.row_len[t], hd = a.hd;
  const int64_t* slots = a.ctx_slots + a.row_seq[t] * a.ctx_stride;
  scores.resize(per * len);
  const float* q = a.q + t * a.q_stride + g * per * hd;
  for (int64_t s = 0; s < len; ++s) {
    const float* k = a.kc + (slots[s] * a.nkv + g) * hd;
    for (int64_t h = 0; h < per; ++h) scores[h * len + s] = ops.dot(q + h * hd, k, hd) * a.scale;
  }
  float* out = a.out + t * a.nh * hd + g * per * hd;
  std::fill(out, out + per * hd, 0.f);
  for (int64_t h = 0; h < per; ++h) {
    float* sc = scores.data() + h * len;
    const float m = *std::max_element(sc, sc + len);
    const float inv = 1.f / ops.exp_shift(sc, len, m);
    for (int64_t s = 0; s < len; ++s) sc[s] *= inv;
  }
  for (int64_t s = 0; s < len; ++s) {
    const float* v = a.vc + (slots[s] * a.nkv + g) * hd;
    for (int64_t h = 0; h < per; ++h) ops.axpy(out + h * hd, scores[h * len + s], v, hd);
  }
}

at::Tensor step(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& tensor_list,
                at::IntArrayRef linears, at::IntArrayRef dims, double eps, const at::Tensor& kv,
                const at::Tensor& cos_t, const at::Tensor& sin_t, const at::Tensor& positions_t,
                const at::Tensor& slot_mapping_t, const at::Tensor& ctx_slots_t, const at::Tensor& row_seq_t,
                const at::Tensor& row_len_t, int64_t path_in) {
  TORCH_CHECK(dims.size() == 6, "layerserve_q4.decode_step: dims = [layers, heads, kv heads, head dim, qk_norm, precise]");
  const int64_t L = dims[0], nh = dims[1], nkv = dims[2], hd = dims[3];
  const bool qk_norm = dims[4] != 0, precise = dims[5] != 0;
  std::vector<at::Tensor> ts;
  ts.reserve(tensor_list.size());
  for (const auto& item : tensor_list) {
    const std::optional<at::Tensor> t = item;
    ts.push_back(t.has_value() ? *t : at::Tensor());
  }
  TORCH_CHECK((int64_t)ts.size() == L * PER_LAYER + 1 && (int64_t)linears.size() == L * 8,
              "layerserve_q4.decode_step: ", ts.size(), " tensors and ", linears.size(), " linear ints for ", L, " layers");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "decode_step: x must be float32 (T, D)");
  TORCH_CHECK(kv.scalar_type() == at::kFloat && kv.is_contiguous() && kv.dim() == 5 && kv.size(0) == L &&
              kv.size(3) == nkv && kv.size(4) == hd, "decode_step: kv must be contiguous float32 (L, 2, S, nkv, hd)");
  TORCH_CHECK(nkv > 0 && nh % nkv == 0 && hd % 2 == 0, "decode_step: bad head counts");
  TORCH_CHECK(cos_t.scalar_type() == at::kFloat && cos_t.is_contiguous() && cos_t.size(1) == hd &&
              sin_t.sizes() == cos_t.sizes() && sin_t.is_contiguous(), "decode_step: cos/sin must be float32 (P, hd)");
  for (const at::Tensor* t : {&positions_t, &slot_mapping_t, &row_seq_t, &row_len_t, &ctx_slots_t})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "decode_step: index tensors must be contiguous int64");
  const int64_t T = x_in.size(0), D = x_in.size(1), qs = nh * hd, kvs = nkv * hd;
  TORCH_CHECK(positions_t.numel() == T && slot_mapping_t.numel() == T && row_seq_t.numel() == T &&
              row_len_t.numel() == T && ctx_slots_t.dim() == 2, "decode_step: one position, slot, sequence and length per row");
  const int64_t S = kv.size(2), P = cos_t.size(0), W = ctx_slots_t.size(1), NS = ctx_slots_t.size(0);
  const int64_t* pos = positions_t.data_ptr<int64_t>();
  const int64_t* slot = slot_mapping_t.data_ptr<int64_t>();
  const int64_t* rseq = row_seq_t.data_ptr<int64_t>();
  const int64_t* rlen = row_len_t.data_ptr<int64_t>();
  const int64_t* cslots = ctx_slots_t.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P && slot[t] >= 0 && slot[t] < S && rseq[t] >= 0 && rseq[t] < NS &&
                rlen[t] >= 1 && rlen[t] <= W, "decode_step: row ", t, " indexes out of range");
    for (int64_t s = 0; s < rlen[t]; ++s)
      TORCH_CHECK(cslots[rseq[t] * W + s] >= 0 && cslots[rseq[t] * W + s] < S, "decode_step: context slot out of range");
  }

  const int64_t path = layerserve_q4::resolve_path(path_in);
  const Ops ops = ops_for(path);
  at::Tensor x = x_in.contiguous().clone();  // the residual stream
  at::Tensor h = at::empty({T, D}, x.options());
  at::Tensor attn = at::empty({T, qs}, x.options());
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  float* kvp = kv.data_ptr<float>();
  const float* cosp = cos_t.data_ptr<float>();
  const float* sinp = sin_t.data_ptr<float>();
  const float scale = (float)(1.0 / std::sqrt((double)hd));

  auto norm_rows = [&](const at::Tensor& w, float* out) {
    TORCH_CHECK(w.defined() && w.scalar_type() == at::kFloat && w.numel() == D, "decode_step: norm weights must be float32 (D,)");
    const float* wp = w.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) rms_norm(xp + t * D, wp, out + t * D, D, eps);
  };
  auto add_rows = [&](const at::Tensor& y) {
    TORCH_CHECK(y.size(0) == T && y.size(1) == D, "decode_step: a projection back to the residual has the wrong shape");
    const float* yp = y.data_ptr<float>();
    for (int64_t i = 0; i < T * D; ++i) xp[i] += yp[i];
  };

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* lt = ts.data() + l * PER_LAYER;
    const int64_t* li = linears.data() + l * 8;
    const Linear qkv_l{li[0], li[1], &lt[1]}, o_l{li[2], li[3], &lt[3]}, gu_l{li[4], li[5], &lt[7]}, down_l{li[6], li[7], &lt[8]};
    TORCH_CHECK(qkv_l.n == qs + 2 * kvs && o_l.n == D && down_l.n == D && gu_l.n % 2 == 0, "decode_step: layer ", l, " shapes");

    norm_rows(lt[0], hp);
    at::Tensor qkv = linear(h, qkv_l, path, precise);
    float* qkvp = qkv.data_ptr<float>();
    if (lt[2].defined()) {
      const float* b = lt[2].data_ptr<float>();
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < qkv_l.n; ++j) qkvp[t * qkv_l.n + j] += b[j];
    }
    float* kc = kvp + (l * 2) * S * kvs;
    float* vc = kc + S * kvs;
    for (int64_t t = 0; t < T; ++t) {
      float* q = qkvp + t * qkv_l.n;
      float* k = q + qs;
      const float* v = k + kvs;
      if (qk_norm) {
        const float* qn = lt[4].data_ptr<float>();
        const float* kn = lt[5].data_ptr<float>();
        for (int64_t i = 0; i < nh; ++i) rms_norm(q + i * hd, qn, q + i * hd, hd, eps);
        for (int64_t i = 0; i < nkv; ++i) rms_norm(k + i * hd, kn, k + i * hd, hd, eps);
      }
      rope(q, cosp + pos[t] * hd, sinp + pos[t] * hd, nh, hd);
      rope(k, cosp + pos[t] * hd, sinp + pos[t] * hd, nkv, hd);
      std::copy(k, k + kvs, kc + slot[t] * kvs);
      std::copy(v, v + kvs, vc + slot[t] * kvs);
    }
    const Attention a{qkvp, qkv_l.n, kc, vc, cslots, W, rseq, rlen, attn.data_ptr<float>(), nh, nkv, hd, scale};
    at::parallel_for(0, T * nkv, 1, [&](int64_t b, int64_t e) {
      std::vector<float> scores;
      for (int64_t i = b; i < e; ++i) attend(a, ops, i / nkv, i % nkv, scores);
    });
    add_rows(linear(attn, o_l, path, precise));

    norm_rows(lt[6], hp);
    at::Tensor gu = linear(h, gu_l, path, precise);
    const int64_t I = gu_l.n / 2;
    at::Tensor act = at::empty({T, I}, x.options());
    const float* gup = gu.data_ptr<float>();
    float* actp = act.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) ops.silu_mul(gup + t * 2 * I, gup + t * 2 * I + I, actp + t * I, I);
    add_rows(linear(act, down_l, path, precise));
  }
  at::Tensor out = at::empty({T, D}, x.options());
  norm_rows(ts.back(), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(layerserve_q4, m) {
  m.def("decode_step(Tensor x, Tensor?[] tensors, int[] linears, int[] dims, float eps, Tensor(a!) kv, Tensor cos, "
        "Tensor sin, Tensor positions, Tensor slot_mapping, Tensor ctx_slots, Tensor row_seq, Tensor row_len, "
        "int path=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(layerserve_q4, CPU, m) {
  m.impl("decode_step", &step);
}
