// One forward step of a Llama-family model over a few rows, every layer in one call.
//
// The eager step (layerserve/model/llama.py) runs ~15 torch ops per layer, ~450 per token for a
// 30-layer model; at ~20 us of Python and dispatch each that was 9 ms of a 14.6 ms token, next to
// 5.4 ms of matmuls. Here the whole stack runs in C++: the matmuls call q4_gemm.cpp directly (or
// at::linear for dense weights), and RMSNorm, RoPE, the KV write, attention, SiLU and the residuals
// are loops over the step's few rows. Same arithmetic as the eager step up to float32 rounding
// order (tests/model/test_compiled_step.py holds it to the eager step). The KV pool is float32 or
// fp16 (the default path's: K/V rounded to nearest even on write, widened to float32 on read).
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

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t PER_LAYER = 9;

// ---------------------------------------------------------------- vector helpers
// Attention's dot products and weighted sums (over a float32 or fp16 KV cache), softmax's
// exponentials and SiLU, in AVX2+FMA+F16C (every host with our int4 kernel's vector paths) or plain C++.

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

using SiluMul = void (*)(const float*, const float*, float*, int64_t);  // out = silu(g) * u

SiluMul silu_mul_for(int64_t path) { return path >= layerserve_q4::PATH_AVX2 ? silu_mul_avx2 : silu_mul_plain; }

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

template <typename KV>  // float, or c10::Half for an fp16 cache
struct Attention {
  const float* q;  // row t's query heads at q + t * q_stride, after RoPE
  int64_t q_stride;
  const KV* kc;  // (S, nkv, hd) this layer's cache
  const KV* vc;
  const int64_t* ctx_slots;
  int64_t ctx_stride;
  const int64_t* row_seq;
  const int64_t* row_len;
  float* out;  // (T, nh * hd)
  int64_t nh, nkv, hd;
  float scale;
};

// Row t, the query heads of kv head g: each K and V row is read once for all of them.
// One function per ISA with the dot products inlined: a call per (key, head) through a function
// pointer cost more than the arithmetic (a 30-layer token at 1,700 tokens of context makes ~460k).
template <typename KV>
void attend_plain(const Attention<KV>& a, int64_t t, int64_t g, std::vector<float>& scores) {
  const int64_t per = a.nh / a.nkv, len = a.row_len[t], hd = a.hd;
  const int64_t* slots = a.ctx_slots + a.row_seq[t] * a.ctx_stride;
  scores.resize(per * len);
  const float* q = a.q + t * a.q_stride + g * per * hd;
  for (int64_t s = 0; s < len; ++s) {
    const KV* k = a.kc + (slots[s] * a.nkv + g) * hd;
    for (int64_t h = 0; h < per; ++h) {
      float d = 0.f;
      for (int64_t i = 0; i < hd; ++i) d += q[h * hd + i] * static_cast<float>(k[i]);
      scores[h * len + s] = d * a.scale;
    }
  }
  float* out = a.out + t * a.nh * hd + g * per * hd;
  std::fill(out, out + per * hd, 0.f);
  for (int64_t h = 0; h < per; ++h) {
    float* sc = scores.data() + h * len;
    const float m = *std::max_element(sc, sc + len);
    const float inv = 1.f / exp_shift_plain(sc, len, m);
    for (int64_t s = 0; s < len; ++s) sc[s] *= inv;
  }
  for (int64_t s = 0; s < len; ++s) {
    const KV* v = a.vc + (slots[s] * a.nkv + g) * hd;
    for (int64_t h = 0; h < per; ++h) {
      const float p = scores[h * len + s];
      for (int64_t i = 0; i < hd; ++i) out[h * hd + i] += p * static_cast<float>(v[i]);
    }
  }
}

template <typename KV>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const KV* p) {
  if constexpr (std::is_same_v<KV, c10::Half>) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else return _mm256_loadu_ps(p);
}

// 8 vectors -> one vector of their 8 horizontal sums
__attribute__((target("avx2,fma"))) inline __m256 hsum8_avx2(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// hd a multiple of 8 (every model we serve: 64, 128, ...). Scores come 8 keys at a time (one
// accumulator per key, one transposing reduction for the 8), and P.V keeps 64 output floats in
// registers over all keys: no horizontal sum per key and no store per key. A kv head's K and V
// rows, re-read for each of its query heads, stay in L2 (1,700 keys of fp16 are 217 KB each).
template <typename KV>
__attribute__((target("avx2,fma,f16c"))) void attend_avx2(const Attention<KV>& a, int64_t t, int64_t g, std::vector<float>& scores) {
  const int64_t per = a.nh / a.nkv, len = a.row_len[t], hd = a.hd, stride = a.nkv * hd;
  const int64_t* slots = a.ctx_slots + a.row_seq[t] * a.ctx_stride;
  scores.resize(per * len);
  const float* q = a.q + t * a.q_stride + g * per * hd;
  const KV* kc = a.kc + g * hd;
  const KV* vc = a.vc + g * hd;
  const __m256 scale = _mm256_set1_ps(a.scale);
  for (int64_t h = 0; h < per; ++h) {
    const float* qh = q + h * hd;
    float* sc = scores.data() + h * len;
    int64_t s = 0;
    for (; s + 8 <= len; s += 8) {
      const KV* k[8];
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) {
        k[j] = kc + slots[s + j] * stride;
        acc[j] = _mm256_setzero_ps();
      }
      for (int64_t i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(qh + i);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(k[j] + i), acc[j]);
      }
      _mm256_storeu_ps(sc + s, _mm256_mul_ps(hsum8_avx2(acc), scale));
    }
    for (; s < len; ++s) {
      const KV* k = kc + slots[s] * stride;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), load8(k + i), acc);
      sc[s] = hsum_avx2(acc) * a.scale;
    }
    const float m = *std::max_element(sc, sc + len);
    const __m256 inv = _mm256_set1_ps(1.f / exp_shift_avx2(sc, len, m));
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) _mm256_storeu_ps(sc + j, _mm256_mul_ps(_mm256_loadu_ps(sc + j), inv));
    for (; j < len; ++j) sc[j] *= _mm256_cvtss_f32(inv);
  }
  float* out = a.out + t * a.nh * hd + g * per * hd;
  for (int64_t h = 0; h < per; ++h) {
    const float* p = scores.data() + h * len;
    for (int64_t i0 = 0; i0 < hd; i0 += 64) {
      const int nb = (int)std::min<int64_t>(8, (hd - i0) / 8);
      __m256 acc[8];
      for (int b = 0; b < 8; ++b) acc[b] = _mm256_setzero_ps();
      if (nb == 8) {
        for (int64_t s = 0; s < len; ++s) {
          const KV* v = vc + slots[s] * stride + i0;
          const __m256 ps = _mm256_set1_ps(p[s]);
          for (int b = 0; b < 8; ++b) acc[b] = _mm256_fmadd_ps(ps, load8(v + 8 * b), acc[b]);
        }
      } else {
        for (int64_t s = 0; s < len; ++s) {
          const KV* v = vc + slots[s] * stride + i0;
          const __m256 ps = _mm256_set1_ps(p[s]);
          for (int b = 0; b < nb; ++b) acc[b] = _mm256_fmadd_ps(ps, load8(v + 8 * b), acc[b]);
        }
      }
      for (int b = 0; b < nb; ++b) _mm256_storeu_ps(out + h * hd + i0 + 8 * b, acc[b]);
    }
  }
}

template <typename KV>
void attend_rows(const Attention<KV>& a, int64_t path, int64_t T) {
  const bool vec = path >= layerserve_q4::PATH_AVX2 && a.hd % 8 == 0;
  at::parallel_for(0, T * a.nkv, 1, [&](int64_t b, int64_t e) {
    std::vector<float> scores;
    for (int64_t i = b; i < e; ++i) {
      if (vec) attend_avx2(a, i / a.nkv, i % a.nkv, scores);
      else attend_plain(a, i / a.nkv, i % a.nkv, scores);
    }
  });
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
  TORCH_CHECK((kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kHalf) && kv.is_contiguous() && kv.dim() == 5 &&
              kv.size(0) == L && kv.size(3) == nkv && kv.size(4) == hd,
              "decode_step: kv must be contiguous float32 or float16 (L, 2, S, nkv, hd)");
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
  const SiluMul silu_mul = silu_mul_for(path);
  at::Tensor x = x_in.contiguous().clone();  // the residual stream
  at::Tensor h = at::empty({T, D}, x.options());
  at::Tensor attn = at::empty({T, qs}, x.options());
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const bool half_kv = kv.scalar_type() == at::kHalf;
  float* kvp = half_kv ? nullptr : kv.data_ptr<float>();
  c10::Half* kvh = half_kv ? kv.data_ptr<c10::Half>() : nullptr;
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
    const int64_t layer_off = (l * 2) * S * kvs;  // this layer's K; its V follows S * kvs later
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
      const int64_t at_k = layer_off + slot[t] * kvs, at_v = at_k + S * kvs;
      if (half_kv) {  // round to nearest even, as torch's .to(float16)
        for (int64_t j = 0; j < kvs; ++j) kvh[at_k + j] = c10::Half(k[j]);
        for (int64_t j = 0; j < kvs; ++j) kvh[at_v + j] = c10::Half(v[j]);
      } else {
        std::copy(k, k + kvs, kvp + at_k);
        std::copy(v, v + kvs, kvp + at_v);
      }
    }
    float* attnp = attn.data_ptr<float>();
    if (half_kv) {
      const Attention<c10::Half> a{qkvp, qkv_l.n, kvh + layer_off, kvh + layer_off + S * kvs, cslots, W, rseq, rlen,
                                   attnp, nh, nkv, hd, scale};
      attend_rows(a, path, T);
    } else {
      const Attention<float> a{qkvp, qkv_l.n, kvp + layer_off, kvp + layer_off + S * kvs, cslots, W, rseq, rlen,
                               attnp, nh, nkv, hd, scale};
      attend_rows(a, path, T);
    }
    add_rows(linear(attn, o_l, path, precise));

    norm_rows(lt[6], hp);
    at::Tensor gu = linear(h, gu_l, path, precise);
    const int64_t I = gu_l.n / 2;
    at::Tensor act = at::empty({T, I}, x.options());
    const float* gup = gu.data_ptr<float>();
    float* actp = act.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) silu_mul(gup + t * 2 * I, gup + t * 2 * I + I, actp + t * I, I);
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
