// What q4_gemm.cpp offers the other sources of the library (decode_step.cpp): the matmuls without
// the dispatcher in between.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace layerserve_q4 {

// Paths, as the ops' `path` argument: 0 plain C++, 1 AVX2+FMA+F16C, 2 AVX512-VNNI; -1 the best here.
constexpr int64_t PATH_PLAIN = 0, PATH_AVX2 = 1, PATH_AVX512 = 2;

// y (M, n) float32 = x (M, K) float32 times packed int4 (Q4_1 grid) / int8 (Q8_0) weights.
at::Tensor matmul_q4(const at::Tensor& x, const at::Tensor& w, int64_t n, int64_t path, bool precise);
at::Tensor matmul_q8(const at::Tensor& x, const at::Tensor& w, int64_t n, int64_t path, bool precise);

// -1 -> the best path this CPU runs; otherwise checks that the CPU runs `path`.
int64_t resolve_path(int64_t path);

}  // namespace layerserve_q4
