// Per-thread work of the CUDA samplewise_linear blend kernel (cuda/samplewise_linear_cuda.cu),
// shared with its CPU grid emulation (cpu/cuda_emulation.cpp). The S partial outputs x @ W_s^T
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

// Output element i of out [rows, OUT] (rows = B * M): partial [S, rows, OUT], bias [S, OUT] or null,
// c [B, S] fp32. Accumulates with math::blend_dot, the CPU kernels' order.
template <typename scalar_t>
DAWIN_HD void blend_partials_element(const scalar_t* __restrict__ partial, const scalar_t* __restrict__ bias,
                                     const float* __restrict__ c, scalar_t* __restrict__ out, int64_t rows, int64_t M,
                                     int64_t OUT, int S, int64_t i) {
  const int64_t total = rows * OUT;
  const int64_t r = i / OUT, n = i - r * OUT;
  const float* cb = c + (r / M) * S;
  float x[math::kMaxSources];
  for (int s = 0; s < S; ++s) x[s] = simt::to_float(partial[s * total + i]);
  float acc = math::blend_dot<0, float>(x, cb, S);
  if (bias != nullptr) {
    for (int s = 0; s < S; ++s) x[s] = simt::to_float(bias[s * OUT + n]);
    acc += math::blend_dot<0, float>(x, cb, S);
  }
  out[i] = static_cast<scalar_t>(acc);
}

}  // namespace samplewise_linear
}  // namespace kernels
}  // namespace dawin_ext
