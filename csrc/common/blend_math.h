// Shared per-element math for the blend and sample-combine kernels (CPU and CUDA).
#pragma once

#include "hd.h"

namespace dawin_ext {
namespace math {

// Largest number of sources / clusters a single blend launch handles. The Python wrapper splits
// larger problems; the limit keeps per-thread accumulators in registers.
constexpr int kMaxSources = 16;
constexpr int kMaxClusters = 16;

// Accumulation type of blend: fp32 for fp32/fp16/bf16 tensors, double for double tensors.
template <typename scalar_t>
struct BlendAcc {
  using type = float;
};
template <>
struct BlendAcc<double> {
  using type = double;
};

// sum_s coef_row[s] * x[s], in the order s = 0, 1, ... (fused multiply-adds where the target has them).
// S > 0 fixes the number of sources at compile time; S == 0 uses num_sources.
template <int S, typename acc_t>
DAWIN_HD acc_t blend_dot(const acc_t* x, const acc_t* coef_row, int num_sources) {
  const int n = S > 0 ? S : num_sources;
  acc_t acc = coef_row[0] * x[0];
  DAWIN_UNROLL
  for (int s = 1; s < (S > 0 ? S : kMaxSources); ++s) {
    if (S == 0 && s >= n) break;
    acc += coef_row[s] * x[s];
  }
  return acc;
}

// out[k] = sum_s coef[k * S + s] * x[s] for k < num_clusters.
template <int S, typename acc_t>
DAWIN_HD void blend_point(const acc_t* x, const acc_t* coef, int num_sources, int num_clusters, acc_t* out) {
  const int n = S > 0 ? S : num_sources;
  for (int k = 0; k < num_clusters; ++k) out[k] = blend_dot<S, acc_t>(x, coef + k * n, n);
}

}  // namespace math
}  // namespace dawin_ext
