// Shared per-element math for the blend and sample-combine kernels (CPU and CUDA).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DAWIN_HD __host__ __device__ __forceinline__
#else
#define DAWIN_HD inline
#endif

namespace dawin_ext {
namespace math {

// Largest number of sources / clusters a single blend launch handles. The Python wrapper splits
// larger problems; the limit keeps per-thread accumulators in registers.
constexpr int kMaxSources = 16;
constexpr int kMaxClusters = 16;

// out[k] = sum_s coef[k * num_sources + s] * x[s], accumulated in fp32.
template <int S>
DAWIN_HD void blend_point(const float* x, const float* coef, int num_clusters, float* out) {
  for (int k = 0; k < num_clusters; ++k) {
    float acc = 0.f;
#pragma unroll
    for (int s = 0; s < S; ++s) acc += coef[k * S + s] * x[s];
    out[k] = acc;
  }
}

DAWIN_HD void blend_point_dynamic(const float* x, const float* coef, int num_sources, int num_clusters, float* out) {
  for (int k = 0; k < num_clusters; ++k) {
    float acc = 0.f;
    for (int s = 0; s < num_sources; ++s) acc += coef[k * num_sources + s] * x[s];
    out[k] = acc;
  }
}

}  // namespace math
}  // namespace dawin_ext
