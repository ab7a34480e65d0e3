// Per-thread work and launch decisions of the CUDA sample_combine kernel
// (cuda/sample_combine_cuda.cu), shared with its CPU grid emulation (cpu/cuda_emulation.cpp).
//
// out[b, m, n] = sum_s w[b, s] * x[b, m, s, n], accumulated in fp32 in the same order as the CPU
// kernel. Each thread owns one group of V output elements (V = one 16-byte pack when N and the
// pointers allow it, else V = 1) and reads its S inputs once.
#pragma once

#include <cstdint>

#include "hd.h"
#include "simt.h"

namespace dawin_ext {
namespace kernels {
namespace sample_combine {

constexpr int kThreads = 256;

// Group `idx` of the rows * (N / V) output groups (rows = B * M; N a multiple of V).
template <typename scalar_t, int V>
DAWIN_HD void combine_group(const scalar_t* __restrict__ x, const float* __restrict__ w, scalar_t* __restrict__ out,
                            int64_t M, int64_t S, int64_t N, int64_t idx) {
  using P = simt::Pack<scalar_t, V>;
  const int64_t groups = N / V;
  const int64_t r = idx / groups;
  const int64_t g = idx - r * groups;
  const float* wb = w + (r / M) * S;
  const scalar_t* xr = x + r * S * N + g * V;
  float acc[V];
  DAWIN_UNROLL
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const P p = *reinterpret_cast<const P*>(xr + s * N);
    const float ws = wb[s];
    DAWIN_UNROLL
    for (int j = 0; j < V; ++j) acc[j] = fmaf(ws, simt::to_float(p.v[j]), acc[j]);
  }
  P o;
  DAWIN_UNROLL
  for (int j = 0; j < V; ++j) o.v[j] = static_cast<scalar_t>(acc[j]);
  *reinterpret_cast<P*>(out + r * N + g * V) = o;
}

// The vector kernel (V = simt::VecWidth) when N is a multiple of the vector width and both
// pointers are 16-byte aligned; else the scalar kernel (V = 1). Host code.
template <typename scalar_t>
inline bool use_vector_kernel(int64_t N, const scalar_t* x, const scalar_t* out) {
  return N % simt::VecWidth<scalar_t>::value == 0 && simt::is_aligned(x, simt::kVecBytes) &&
         simt::is_aligned(out, simt::kVecBytes);
}

}  // namespace sample_combine
}  // namespace kernels
}  // namespace dawin_ext
