// Per-element work of samplewise_lora's middle step, shared by the CPU kernel (cpu/samplewise_lora_cpu.cpp)
// and the CUDA kernel (cuda/samplewise_lora_cuda.cu).
//
// samplewise_lora is shrink -> scale -> expand: h = x @ [A_0; ...; A_{S-1}]^T gives every row's S rank blocks
// side by side ([rows, S * R]); each sample's block s is then multiplied by its coefficient c[b, s] (this step);
// out += h @ [B_0, ..., B_{S-1}]^T expands all blocks in one GEMM. Scaling the rank blocks instead of the
// [OUT, IN] weights is what makes per-sample soft mixing of S adapters cost one GEMM pair, never a merged weight.
#pragma once

#include <cstdint>

#include "hd.h"
#include "simt.h"

namespace dawin_ext {
namespace kernels {
namespace samplewise_lora {

constexpr int kThreads = 256;

// One row of h ([S * R] entries; row `r` belongs to sample r / M): h[s * R + k] *= c[s], in fp32, rounded once.
template <typename scalar_t>
DAWIN_HD void scale_row(scalar_t* __restrict__ h, const float* __restrict__ c, int64_t S, int64_t R) {
  for (int64_t s = 0; s < S; ++s) {
    const float cs = c[s];
    scalar_t* hs = h + s * R;
    for (int64_t k = 0; k < R; ++k) hs[k] = static_cast<scalar_t>(simt::to_float(hs[k]) * cs);
  }
}

// Element `idx` of the rows * S * R entries of h (the GPU's one-thread-per-element form of scale_row).
template <typename scalar_t>
DAWIN_HD void scale_element(scalar_t* __restrict__ h, const float* __restrict__ c, int64_t M, int64_t S, int64_t R,
                            int64_t idx) {
  const int64_t width = S * R;
  const int64_t r = idx / width;
  const int64_t s = (idx - r * width) / R;
  h[idx] = static_cast<scalar_t>(simt::to_float(h[idx]) * c[(r / M) * S + s]);
}

}  // namespace samplewise_lora
}  // namespace kernels
}  // namespace dawin_ext
