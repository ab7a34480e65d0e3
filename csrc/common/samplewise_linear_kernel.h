// Per-thread work of the CUDA samplewise_linear blend kernel (cuda/samplewise_linear_cuda.cu),
// shared with its CPU grid emulation (cpu/cuda_emulation.cpp). The G partial outputs x @ W_g^T
// come from cuBLAS; this kernel blends them per sample and adds the merged bias.
#pragma once

#include <cstdint>

#include "blend_math.h"
#include "hd.h"
#include "simt.h"

namespace dawin_ext {
namespace kernels {
namespace samplewise_linear {

constexpr int kThreads = 256;

// Output element i of out [rows, N] (rows = B * M): partial [G, rows, N], bias [G, N] or null,
// c [B, G] fp32. Accumulates with math::blend_dot, the CPU kernels' order.
template <typename scalar_t>
DAWIN_HD void blend_partials_element(const scalar_t* __restrict__ partial, const scalar_t* __restrict__ bias,
                                     const float* __restrict__ c, scalar_t* __restrict__ out, int64_t rows, int64_t M,
                                     int64_t N, int G, int64_t i) {
  const int64_t total = rows * N;
  const int64_t r = i / N, n = i - r * N;
  const float* cb = c + (r / M) * G;
  float x[math::kMaxSources];
  for (int g = 0; g < G; ++g) x[g] = simt::to_float(partial[g * total + i]);
  float acc = math::blend_dot<0, float>(x, cb, G);
  if (bias != nullptr) {
    for (int g = 0; g < G; ++g) x[g] = simt::to_float(bias[g * N + n]);
    acc += math::blend_dot<0, float>(x, cb, G);
  }
  out[i] = static_cast<scalar_t>(acc);
}

}  // namespace samplewise_linear
}  // namespace kernels
}  // namespace dawin_ext
