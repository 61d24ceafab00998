// Low-bit matmul for CPU decode: int4 weights (group 32 along K, a scale d and a min m per group:
// w = d*q + m, q in 0..15, i.e. GGUF Q4_1; Q4_0 is m = -8d) times int8 activations quantized per row
// and group of 32 (llama.cpp's Q8_1: x ~ dx*qx, and sx = dx*sum(qx) carries the min term).
//
//   y[m][n] = sum_g  (d[n][g]*dx[m][g]) * sum_k q[n][k]*qx[m][k]  +  m[n][g]*sx[m][g]
//
// Packed layout (built by layerserve/kernels/q4.py:pack_q4): output rows in tiles of R=16, one
// block of 320 bytes per (tile, group), the blocks of a tile contiguous along K, tiles contiguous:
//   bytes   0..255  nibbles: byte 64*c + 4*r + j (c = 0..3 chunks, r = row in tile, j = 0..3)
//                   low nibble = q[r][32g + 8c + j], high nibble = q[r][32g + 8c + 4 + j]
//   bytes 256..287  d of the 16 rows, fp16
//   bytes 288..319  m of the 16 rows, fp16
// So a 64-byte chunk split into low and high nibbles gives, per 32-bit lane r, four consecutive k
// of row r: one dpbusd (or maddubs+madd) against a broadcast of four activation bytes makes the
// 16 rows' partial dot products in the 16 lanes; the per-group float scaling is then one vector
// op over 16 output rows. One pass over a tile streams contiguous memory.
//
// Three paths with identical arithmetic (bit-identical results): AVX512-VNNI, AVX2+FMA+F16C, plain
// C++. Each vector path is compiled with a per-function target attribute (no -march), chosen at
// run time with __builtin_cpu_supports. Parallel over tiles with at::parallel_for (torch's pool).
//
// Second op, matmul_q8: int8 weights (GGUF Q8_0: w = d*q, q int8, one fp16 d per row and group of
// 32) times the same int8 activations:  y[m][n] = sum_g (d[n][g]*dx[m][g]) * sum_k q[n][k]*qx[m][k].
// Packed layout (layerserve/kernels/q4.py:pack_q8): tiles of R=16 rows, one block of 544 bytes per
// (tile, group), blocks of a tile contiguous along K:
//   bytes   0..511  int8: byte 64*c + 4*r + j (c = 0..7, r = row in tile, j = 0..3) = q[r][32g + 4c + j]
//   bytes 512..543  d of the 16 rows, fp16
// Signed x signed products: AVX512-VNNI's dpbusd is unsigned x signed, so the weight bytes are
// flipped to q+128 (xor 0x80) and the accumulator starts at -128*sum(qx) of the group (exact in
// int32); AVX2 uses maddubs(|q|, sign(qx, q)) + madd (llama.cpp's mul_sum_i8_pairs). Zen 4 has no
// AVX-VNNI-INT8 (vpdpbssd), so it is not used.
//
// precise mode (both ops): each activation row x is quantized twice, x ~ dx*q1 + r with r = x - dx*q1
// (float32: one multiply, one subtract), and r quantized again per group (dr = max|r|/127, q2, sr).
// The two are rows 2i and 2i+1 of a 2M-row activation matrix, so every weight tile is read once for
// both; each row accumulates exactly as in the one-pass kernel and the tile kernel stores the float32
// sum of the two accumulators (acc(q1) + acc(q2)): y = sum_g d*(dx*isum(q,q1) + dr*isum(q,q2)) + m*(sx + sr).

#include "q4_gemm.h"

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int R = 16;               // output rows per tile
constexpr int GK = 32;              // K per group
constexpr int NIB = R * GK / 2;     // 256 bytes of nibbles per (tile, group)
constexpr int BLK = NIB + 4 * R;    // + 16 fp16 d + 16 fp16 m = 320 bytes

enum Path : int64_t { PLAIN = 0, AVX2 = 1, AVX512 = 2 };

bool cpu_has(Path p) {
  __builtin_cpu_init();
  switch (p) {
    case PLAIN:
      return true;
    case AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
}

Path best_path() {
  static const Path best = cpu_has(AVX512) ? AVX512 : cpu_has(AVX2) ? AVX2 : PLAIN;
  return best;
}

Path resolve(int64_t path) {
  if (path < 0) return best_path();
  TORCH_CHECK(path <= AVX512, "layerserve_q4: unknown path ", path);
  TORCH_CHECK(cpu_has(static_cast<Path>(path)), "layerserve_q4: this CPU does not support path ", path);
  return static_cast<Path>(path);
}

// Quantized activations: q (M, K) int8, d and s (M, G) float.
struct Act {
  const int8_t* q;
  const float* d;
  const float* s;
  int64_t K, G;
  const int32_t* qsum = nullptr;  // (M, G) integer sums of q (matmul_q8 only)
};

constexpr int Q8B = R * GK;         // 512 int8 per (tile, group)
constexpr int Q8BLK = Q8B + 2 * R;  // + 16 fp16 d = 544 bytes

// ---------------------------------------------------------------- fp16 -> fp32, exact, portable
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400u));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// ---------------------------------------------------------------- activation quantization
// Per group of 32: amax = max|x|, d = amax / 127, id = d ? 1/d : 0, q = round-half-even(x * id),
// s = d * sum(q). The vector versions do the same IEEE operations, so all paths agree bitwise.

void quant_row_plain(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  for (int64_t g = 0; g < K / GK; ++g) {
    const float* xg = x + g * GK;
    float amax = 0.f;
    for (int j = 0; j < GK; ++j) amax = std::max(amax, std::fabs(xg[j]));
    const float dd = amax / 127.f;
    const float id = dd != 0.f ? 1.f / dd : 0.f;
    int sum = 0;
    for (int j = 0; j < GK; ++j) {
      int v = (int)std::nearbyint(xg[j] * id);
      v = std::min(127, std::max(-127, v));
      q[g * GK + j] = (int8_t)v;
      sum += v;
    }
    d[g] = dd;
    s[g] = dd * (float)sum;
  }
}

__attribute__((target("avx2,fma,f16c")))
void quant_row_avx2(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < K / GK; ++g) {
    const float* xg = x + g * GK;
    __m256 v0 = _mm256_loadu_ps(xg), v1 = _mm256_loadu_ps(xg + 8);
    __m256 v2 = _mm256_loadu_ps(xg + 16), v3 = _mm256_loadu_ps(xg + 24);
    __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
    a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
    const float amax = _mm_cvtss_f32(a4);
    const float dd = amax / 127.f;
    const float id = dd != 0.f ? 1.f / dd : 0.f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid));  // MXCSR rounding: nearest even
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, perm);
    _mm256_storeu_si256((__m256i*)(q + g * GK), p);
    d[g] = dd;
    s[g] = dd * (float)_mm_cvtsi128_si32(s4);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void quant_row_avx512(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  for (int64_t g = 0; g < K / GK; ++g) {
    const float* xg = x + g * GK;
    const __m512 v0 = _mm512_loadu_ps(xg), v1 = _mm512_loadu_ps(xg + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float dd = amax / 127.f;
    const float id = dd != 0.f ? 1.f / dd : 0.f;
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
    _mm_storeu_si128((__m128i*)(q + g * GK), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128((__m128i*)(q + g * GK + 16), _mm512_cvtsepi32_epi8(i1));
    d[g] = dd;
    s[g] = dd * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
  }
}

inline void quant_row(const float* x, int64_t K, int8_t* q, float* d, float* s, Path path) {
  if (path == AVX512) quant_row_avx512(x, K, q, d, s);
  else if (path == AVX2) quant_row_avx2(x, K, q, d, s);
  else quant_row_plain(x, K, q, d, s);
}

// precise: 2M output rows, row 2i = x[i] quantized, row 2i+1 = its residual x - d*q quantized (the
// residual in plain float32 code on every path: r = x - d*(float)q, two roundings, no FMA).
void quantize(const float* x, int64_t M, int64_t K, int8_t* q, float* d, float* s, Path path, bool precise = false) {
  const int64_t G = K / GK;
  if (!precise) {
    for (int64_t i = 0; i < M; ++i) quant_row(x + i * K, K, q + i * K, d + i * G, s + i * G, path);
    return;
  }
  std::vector<float> r(K);
  for (int64_t i = 0; i < M; ++i) {
    const float* xi = x + i * K;
    int8_t* q1 = q + 2 * i * K;
    float* d1 = d + 2 * i * G;
    quant_row(xi, K, q1, d1, s + 2 * i * G, path);
    for (int64_t g = 0; g < G; ++g) {
      const float dd = d1[g];
      for (int j = 0; j < GK; ++j) {
        const int64_t k = g * GK + j;
        r[k] = xi[k] - dd * (float)q1[k];
      }
    }
    quant_row(r.data(), K, q1 + K, d1 + G, s + (2 * i + 1) * G, path);
  }
}

// ---------------------------------------------------------------- tile stores (both ops)
// A tile's MB accumulator rows -> y rows m0.. (ncols < 16 for the last, partial tile); precise (P):
// rows m0+i, m0+i+1 are the two passes of output row (m0+i)/2, summed before the store.

template <int MB, bool P>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline void store_tile_avx512(__m512 (&acc)[MB], int64_t m0, float* __restrict y, int64_t ldy, int ncols) {
  const __mmask16 keep = ncols >= R ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
  if constexpr (P) {
    static_assert(MB % 2 == 0);
    for (int i = 0; i < MB; i += 2)
      _mm512_mask_storeu_ps(y + ((m0 + i) / 2) * ldy, keep, _mm512_add_ps(acc[i], acc[i + 1]));
  } else {
    for (int i = 0; i < MB; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * ldy, keep, acc[i]);
  }
}

// AVX2 tiles keep the 16 rows as two 8-float halves.
template <int MB, bool P>
__attribute__((target("avx2,fma,f16c")))
inline void store_tile_avx2(__m256 (&acc)[2][MB], int64_t m0, float* __restrict y, int64_t ldy, int ncols) {
  if constexpr (P) {
    static_assert(MB % 2 == 0);
    for (int i = 0; i < MB; i += 2) {
      acc[0][i / 2] = _mm256_add_ps(acc[0][i], acc[0][i + 1]);
      acc[1][i / 2] = _mm256_add_ps(acc[1][i], acc[1][i + 1]);
    }
  }
  constexpr int NOUT = P ? MB / 2 : MB;
  const int64_t o0 = P ? m0 / 2 : m0;
  for (int i = 0; i < NOUT; ++i) {
    float* yp = y + (o0 + i) * ldy;
    if (ncols >= R) {
      _mm256_storeu_ps(yp, acc[0][i]);
      _mm256_storeu_ps(yp + 8, acc[1][i]);
    } else {
      alignas(32) float tmp[R];
      _mm256_store_ps(tmp, acc[0][i]);
      _mm256_store_ps(tmp + 8, acc[1][i]);
      std::memcpy(yp, tmp, sizeof(float) * ncols);
    }
  }
}

// ---------------------------------------------------------------- tile kernels
// One tile (16 output rows, all of K) against MB activation rows m0..m0+MB-1; writes y[m][0..ncols).

template <int MB, bool P = false>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void tile_avx512(const uint8_t* __restrict blk, const Act& a, int64_t m0, float* __restrict y, int64_t ldy, int ncols) {
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const int8_t* xq = a.q + m0 * a.K;
  const float* xd = a.d + m0 * a.G;
  const float* xs = a.s + m0 * a.G;
  for (int64_t g = 0; g < a.G; ++g, blk += BLK) {
    __m512i ia[MB], ib[MB];
    for (int i = 0; i < MB; ++i) ia[i] = ib[i] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512((const void*)(blk + 64 * c));
      const __m512i lo = _mm512_and_si512(v, mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      for (int i = 0; i < MB; ++i) {
        const int8_t* xp = xq + i * a.K + g * GK + 8 * c;
        int32_t x0, x1;
        std::memcpy(&x0, xp, 4);
        std::memcpy(&x1, xp + 4, 4);
        ia[i] = _mm512_dpbusd_epi32(ia[i], lo, _mm512_set1_epi32(x0));
        ib[i] = _mm512_dpbusd_epi32(ib[i], hi, _mm512_set1_epi32(x1));
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + NIB)));
    const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + NIB + 2 * R)));
    for (int i = 0; i < MB; ++i) {
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(ia[i], ib[i]));
      acc[i] = _mm512_fmadd_ps(sum, _mm512_mul_ps(dw, _mm512_set1_ps(xd[i * a.G + g])), acc[i]);
      acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[i * a.G + g]), acc[i]);
    }
  }
  store_tile_avx512<MB, P>(acc, m0, y, ldy, ncols);
}

template <int MB, bool P = false>
__attribute__((target("avx2,fma,f16c")))
void tile_avx2(const uint8_t* __restrict blk, const Act& a, int64_t m0, float* __restrict y, int64_t ldy, int ncols) {
  // 16 registers: the two 8-row halves of the tile are done one after the other (the second one's
  // bytes are in L1 by then), so a half needs MB int16 sums + MB float sums + 5 temporaries.
  __m256 acc[2][MB];
  for (int i = 0; i < MB; ++i) acc[0][i] = acc[1][i] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq = a.q + m0 * a.K;
  const float* xd = a.d + m0 * a.G;
  const float* xs = a.s + m0 * a.G;
  for (int h = 0; h < 2; ++h) {
    const uint8_t* b = blk + 32 * h;
    for (int64_t g = 0; g < a.G; ++g, b += BLK) {
      // int16 sums of 8 maddubs results per lane: |.| <= 8 * 2*15*127 = 30480, no overflow.
      __m256i s16[MB];
      for (int i = 0; i < MB; ++i) s16[i] = _mm256_setzero_si256();
#pragma GCC unroll 1
      for (int c = 0; c < 4; ++c) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(b + 64 * c));
        const __m256i lo = _mm256_and_si256(v, mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        for (int i = 0; i < MB; ++i) {
          const int8_t* xp = xq + i * a.K + g * GK + 8 * c;
          int32_t x0, x1;
          std::memcpy(&x0, xp, 4);
          std::memcpy(&x1, xp + 4, 4);
          s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)));
          s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
        }
      }
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b - 32 * h + NIB + 16 * h)));
      const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b - 32 * h + NIB + 2 * R + 16 * h)));
      for (int i = 0; i < MB; ++i) {
        const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[i], ones));
        acc[h][i] = _mm256_fmadd_ps(sum, _mm256_mul_ps(dw, _mm256_set1_ps(xd[i * a.G + g])), acc[h][i]);
        acc[h][i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[i * a.G + g]), acc[h][i]);
      }
    }
  }
  store_tile_avx2<MB, P>(acc, m0, y, ldy, ncols);
}

void tile_plain(const uint8_t* blk, const Act& a, int64_t m0, int64_t mb, float* y, int64_t ldy, int ncols,
                bool precise) {
  float acc[R], prev[R];
  for (int64_t i = 0; i < mb; ++i) {
    const int8_t* xq = a.q + (m0 + i) * a.K;
    std::fill(acc, acc + R, 0.f);
    const uint8_t* b = blk;
    for (int64_t g = 0; g < a.G; ++g, b += BLK) {
      const int8_t* xg = xq + g * GK;
      const float xd = a.d[(m0 + i) * a.G + g], xs = a.s[(m0 + i) * a.G + g];
      for (int r = 0; r < R; ++r) {
        int32_t sum = 0;
        for (int c = 0; c < 4; ++c) {
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = b[64 * c + 4 * r + j];
            sum += (int32_t)(byte & 0x0F) * xg[8 * c + j] + (int32_t)(byte >> 4) * xg[8 * c + 4 + j];
          }
        }
        uint16_t hd, hm;
        std::memcpy(&hd, b + NIB + 2 * r, 2);
        std::memcpy(&hm, b + NIB + 2 * R + 2 * r, 2);
        const float dw = half_to_float(hd), mw = half_to_float(hm);
        acc[r] = std::fma((float)sum, dw * xd, acc[r]);
        acc[r] = std::fma(mw, xs, acc[r]);
      }
    }
    if (precise) {  // rows 2j, 2j+1 (m0 even) are the two passes of output row j
      if (((m0 + i) & 1) == 0) {
        std::memcpy(prev, acc, sizeof(acc));
        continue;
      }
      for (int r = 0; r < R; ++r) acc[r] = prev[r] + acc[r];
      std::memcpy(y + ((m0 + i) / 2) * ldy, acc, sizeof(float) * std::min(ncols, R));
    } else {
      std::memcpy(y + (m0 + i) * ldy, acc, sizeof(float) * std::min(ncols, R));
    }
  }
}


// ---------------------------------------------------------------- int8-weight tile kernels (matmul_q8)

template <int MB, bool P = false>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void q8_tile_avx512(const uint8_t* __restrict blk, const Act& a, int64_t m0, float* __restrict y, int64_t ldy, int ncols) {
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const int8_t* xq = a.q + m0 * a.K;
  const float* xd = a.d + m0 * a.G;
  const int32_t* xsum = a.qsum + m0 * a.G;
  for (int64_t g = 0; g < a.G; ++g, blk += Q8BLK) {
    // sum (q+128)*qx - 128*sum(qx) = sum q*qx, exactly
    __m512i ia[MB], ib[MB];
    for (int i = 0; i < MB; ++i) {
      ia[i] = _mm512_set1_epi32(-128 * xsum[i * a.G + g]);
      ib[i] = _mm512_setzero_si512();
    }
    for (int c = 0; c < 8; c += 2) {
      const __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512((const void*)(blk + 64 * c)), flip);
      const __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512((const void*)(blk + 64 * c + 64)), flip);
      for (int i = 0; i < MB; ++i) {
        const int8_t* xp = xq + i * a.K + g * GK + 4 * c;
        int32_t x0, x1;
        std::memcpy(&x0, xp, 4);
        std::memcpy(&x1, xp + 4, 4);
        ia[i] = _mm512_dpbusd_epi32(ia[i], v0, _mm512_set1_epi32(x0));
        ib[i] = _mm512_dpbusd_epi32(ib[i], v1, _mm512_set1_epi32(x1));
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + Q8B)));
    for (int i = 0; i < MB; ++i) {
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(ia[i], ib[i]));
      acc[i] = _mm512_fmadd_ps(sum, _mm512_mul_ps(dw, _mm512_set1_ps(xd[i * a.G + g])), acc[i]);
    }
  }
  store_tile_avx512<MB, P>(acc, m0, y, ldy, ncols);
}

template <int MB, bool P = false>
__attribute__((target("avx2,fma,f16c")))
void q8_tile_avx2(const uint8_t* __restrict blk, const Act& a, int64_t m0, float* __restrict y, int64_t ldy, int ncols) {
  // The two 8-row halves of the tile one after the other, as tile_avx2.
  __m256 acc[2][MB];
  for (int i = 0; i < MB; ++i) acc[0][i] = acc[1][i] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq = a.q + m0 * a.K;
  const float* xd = a.d + m0 * a.G;
  for (int h = 0; h < 2; ++h) {
    const uint8_t* b = blk + 32 * h;
    for (int64_t g = 0; g < a.G; ++g, b += Q8BLK) {
      __m256i s32[MB];
      for (int i = 0; i < MB; ++i) s32[i] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(b + 64 * c));
        const __m256i av = _mm256_sign_epi8(v, v);  // |q| (as unsigned: -128 -> 128)
        for (int i = 0; i < MB; ++i) {
          int32_t x0;
          std::memcpy(&x0, xq + i * a.K + g * GK + 4 * c, 4);
          // |q| * (qx with q's sign): |.| <= 2*128*127 per int16 pair, no saturation
          const __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(_mm256_set1_epi32(x0), v));
          s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(p, ones));
        }
      }
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b - 32 * h + Q8B + 16 * h)));
      for (int i = 0; i < MB; ++i) {
        const __m256 sum = _mm256_cvtepi32_ps(s32[i]);
        acc[h][i] = _mm256_fmadd_ps(sum, _mm256_mul_ps(dw, _mm256_set1_ps(xd[i * a.G + g])), acc[h][i]);
      }
    }
  }
  store_tile_avx2<MB, P>(acc, m0, y, ldy, ncols);
}

void q8_tile_plain(const uint8_t* blk, const Act& a, int64_t m0, int64_t mb, float* y, int64_t ldy, int ncols,
                   bool precise) {
  float acc[R], prev[R];
  for (int64_t i = 0; i < mb; ++i) {
    const int8_t* xq = a.q + (m0 + i) * a.K;
    std::fill(acc, acc + R, 0.f);
    const uint8_t* b = blk;
    for (int64_t g = 0; g < a.G; ++g, b += Q8BLK) {
      const int8_t* xg = xq + g * GK;
      const float xd = a.d[(m0 + i) * a.G + g];
      for (int r = 0; r < R; ++r) {
        int32_t sum = 0;
        for (int c = 0; c < 8; ++c)
          for (int j = 0; j < 4; ++j) sum += (int32_t)(int8_t)b[64 * c + 4 * r + j] * xg[4 * c + j];
        uint16_t hd;
        std::memcpy(&hd, b + Q8B + 2 * r, 2);
        acc[r] = std::fma((float)sum, half_to_float(hd) * xd, acc[r]);
      }
    }
    if (precise) {  // rows 2j, 2j+1 (m0 even) are the two passes of output row j
      if (((m0 + i) & 1) == 0) {
        std::memcpy(prev, acc, sizeof(acc));
        continue;
      }
      for (int r = 0; r < R; ++r) acc[r] = prev[r] + acc[r];
      std::memcpy(y + ((m0 + i) / 2) * ldy, acc, sizeof(float) * std::min(ncols, R));
    } else {
      std::memcpy(y + (m0 + i) * ldy, acc, sizeof(float) * std::min(ncols, R));
    }
  }
}

using TileFn = void (*)(const uint8_t*, const Act&, int64_t, float*, int64_t, int);

// The tile kernel for MB activation rows (precise: MB even, pairs of passes) of int4 or int8 weights.
template <bool Q8, int MB, bool P>
TileFn avx512_tile() { if constexpr (Q8) return q8_tile_avx512<MB, P>; else return tile_avx512<MB, P>; }

template <bool Q8, int MB, bool P>
TileFn avx2_tile() { if constexpr (Q8) return q8_tile_avx2<MB, P>; else return tile_avx2<MB, P>; }

template <bool Q8>
TileFn avx512_fn(int64_t mb, bool precise) {
  if (precise) switch (mb) {
    case 2: return avx512_tile<Q8, 2, true>();
    case 4: return avx512_tile<Q8, 4, true>();
    case 6: return avx512_tile<Q8, 6, true>();
    default: return avx512_tile<Q8, 8, true>();
  }
  switch (mb) {
    case 1: return avx512_tile<Q8, 1, false>();
    case 2: return avx512_tile<Q8, 2, false>();
    case 3: return avx512_tile<Q8, 3, false>();
    case 4: return avx512_tile<Q8, 4, false>();
    case 5: return avx512_tile<Q8, 5, false>();
    case 6: return avx512_tile<Q8, 6, false>();
    case 7: return avx512_tile<Q8, 7, false>();
    default: return avx512_tile<Q8, 8, false>();
  }
}

template <bool Q8>
TileFn avx2_fn(int64_t mb, bool precise) {
  if (precise) return mb == 2 ? avx2_tile<Q8, 2, true>() : avx2_tile<Q8, 4, true>();
  switch (mb) {
    case 1: return avx2_tile<Q8, 1, false>();
    case 2: return avx2_tile<Q8, 2, false>();
    case 3: return avx2_tile<Q8, 3, false>();
    default: return avx2_tile<Q8, 4, false>();
  }
}

constexpr int64_t MB_AVX512 = 8;
constexpr int64_t MB_AVX2 = 4;

// ---------------------------------------------------------------- ops

// y = x W^T for packed int4 (Q8 = false) or int8 (Q8 = true) weights: quantize x's rows, then each
// 16-row weight tile against all activation rows, tiles split over torch's threads.
template <bool Q8>
at::Tensor matmul(const at::Tensor& x_in, const at::Tensor& w, int64_t n, int64_t path_in, bool precise) {
  const int64_t block = Q8 ? Q8BLK : BLK;
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "layerserve_q4: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "layerserve_q4: x must be float32 (M, K)");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.size(2) == block && w.is_contiguous(),
              "layerserve_q4: packed ", Q8 ? "q8" : "q4", " weights must be contiguous uint8 (N/16, K/32, ", block, ")");
  TORCH_CHECK(x_in.size(1) == w.size(1) * GK, "layerserve_q4: x has K=", x_in.size(1), ", weights K=", w.size(1) * GK);
  TORCH_CHECK(n > (w.size(0) - 1) * R && n <= w.size(0) * R, "layerserve_q4: n=", n, " does not fit ", w.size(0), " tiles");
  const Path path = resolve(path_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = K / GK, NT = w.size(0);
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  if (K == 0) return y.zero_();
  const int64_t MA = precise ? 2 * M : M;  // activation rows: two passes per row when precise
  std::vector<int8_t> xq(MA * K);
  std::vector<float> xd(MA * G), xs(MA * G);
  quantize(x.data_ptr<float>(), M, K, xq.data(), xd.data(), xs.data(), path, precise);
  std::vector<int32_t> qsum;  // matmul_q8's signed products need each group's sum of qx
  if constexpr (Q8) {
    qsum.resize(MA * G);
    for (int64_t i = 0; i < MA * G; ++i) {
      int32_t t = 0;
      for (int j = 0; j < GK; ++j) t += xq[i * GK + j];
      qsum[i] = t;
    }
  }
  const Act a{xq.data(), xd.data(), xs.data(), K, G, Q8 ? qsum.data() : nullptr};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t tile_bytes = G * block;
  // At least ~16 KB of weights per thread: smaller work is not worth waking a thread for.
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, tile_bytes));
  at::parallel_for(0, NT, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* blk = wp + t * tile_bytes;
      float* yt = yp + t * R;
      const int ncols = (int)std::min<int64_t>(R, n - t * R);
      for (int64_t m0 = 0; m0 < MA;) {
        if (path == AVX512) {
          const int64_t mb = std::min(MB_AVX512, MA - m0);
          avx512_fn<Q8>(mb, precise)(blk, a, m0, yt, n, ncols);
          m0 += mb;
        } else if (path == AVX2) {
          const int64_t mb = std::min(MB_AVX2, MA - m0);
          avx2_fn<Q8>(mb, precise)(blk, a, m0, yt, n, ncols);
          m0 += mb;
        } else {
          if constexpr (Q8) q8_tile_plain(blk, a, m0, MA - m0, yt, n, ncols, precise);
          else tile_plain(blk, a, m0, MA - m0, yt, n, ncols, precise);
          m0 = MA;
        }
      }
    }
  });
  return y;
}

at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& w, int64_t n, int64_t path, bool precise) {
  return matmul<false>(x, w, n, path, precise);
}

at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& w, int64_t n, int64_t path, bool precise) {
  return matmul<true>(x, w, n, path, precise);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> q4_quantize_rows(const at::Tensor& x_in, int64_t path_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.size(1) % GK == 0,
              "layerserve_q4: x must be float32 (M, K), K a multiple of 32");
  const Path path = resolve(path_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = K / GK;
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, G}, x.options());
  at::Tensor s = at::empty({M, G}, x.options());
  quantize(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<float>(), path);
  return {q, d, s};
}

std::vector<int64_t> q4_paths() {
  std::vector<int64_t> out;
  for (Path p : {AVX512, AVX2, PLAIN})
    if (cpu_has(p)) out.push_back(p);
  return out;  // best first
}

// How many of torch's threads a parallel_for here runs on (a check that at::parallel_for works
// inside this library, on torch's own OpenMP pool).
int64_t q4_threads_seen() {
  std::vector<int> seen(256, 0);
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < 256) seen[t] = 1;
  });
  int64_t n = 0;
  for (int v : seen) n += v;
  return n;
}

}  // namespace

namespace layerserve_q4 {
at::Tensor matmul_q4(const at::Tensor& x, const at::Tensor& w, int64_t n, int64_t path, bool precise) {
  return q4_matmul(x, w, n, path, precise);
}
at::Tensor matmul_q8(const at::Tensor& x, const at::Tensor& w, int64_t n, int64_t path, bool precise) {
  return q8_matmul(x, w, n, path, precise);
}
int64_t resolve_path(int64_t path) { return resolve(path); }
}  // namespace layerserve_q4

TORCH_LIBRARY(layerserve_q4, m) {
  m.def("matmul(Tensor x, Tensor w, int n, int path=-1, bool precise=False) -> Tensor");
  m.def("matmul_q8(Tensor x, Tensor w, int n, int path=-1, bool precise=False) -> Tensor");
  m.def("quantize_rows(Tensor x, int path=-1) -> (Tensor, Tensor, Tensor)");
  m.def("paths() -> int[]", &q4_paths);
  m.def("threads_seen() -> int", &q4_threads_seen);
}

TORCH_LIBRARY_IMPL(layerserve_q4, CPU, m) {
  m.impl("matmul", &q4_matmul);
  m.impl("matmul_q8", &q8_matmul);
  m.impl("quantize_rows", &q4_quantize_rows);
}
