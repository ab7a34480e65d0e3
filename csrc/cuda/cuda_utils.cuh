// Shared CUDA helpers for the dawin_ext kernels: aligned vector packs, element conversion, launch
// sizing and the warp / block merge of the softmax-entropy state (common/entropy_math.h).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common/entropy_math.h"

namespace dawin_ext {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kVecBytes = 16;  // one 128-bit load per thread

// kN elements of T loaded or stored as one 16-byte access; the caller guarantees the alignment.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

template <typename T>
struct VecWidth {
  static constexpr int value = kVecBytes / static_cast<int>(sizeof(T));
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

__host__ __device__ __forceinline__ bool is_aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// Merges the states of all 32 lanes of a warp (butterfly: every lane ends with the merged state).
__device__ __forceinline__ math::EntropyState warp_merge(math::EntropyState st) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    math::EntropyState other;
    other.m = __shfl_xor_sync(kFullMask, st.m, offset);
    other.s = __shfl_xor_sync(kFullMask, st.s, offset);
    other.t = __shfl_xor_sync(kFullMask, st.t, offset);
    st = math::entropy_state_merge(st, other);
  }
  return st;
}

// Merges the states of all threads of a block (blockDim.x a multiple of 32, at most 1024). The
// result is valid in thread 0. `scratch` holds 3 * 32 floats of shared memory; the block
// synchronizes before returning so that scratch can be reused.
__device__ __forceinline__ math::EntropyState block_merge(math::EntropyState st, float* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  st = warp_merge(st);
  if (lane == 0) {
    scratch[warp] = st.m;
    scratch[kWarp + warp] = st.s;
    scratch[2 * kWarp + warp] = st.t;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? math::EntropyState{scratch[lane], scratch[kWarp + lane], scratch[2 * kWarp + lane]}
                      : math::entropy_state_empty();
    st = warp_merge(st);
  }
  __syncthreads();
  return st;
}

// Calls f(scalar_t{}) for the dtypes the kernels take (fp32, fp16, bf16); the argument checks
// have already rejected every other dtype, so reaching default is a bug.
template <typename F>
void dispatch_float_types(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

// Grid size for a grid-stride loop over `work` items with `per_block` items per block: enough
// blocks to fill the device a few times over, never more than there is work.
inline int grid_for(int64_t work, int64_t per_block, int blocks_per_sm = 8) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t need = (work + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(need, sms * blocks_per_sm)));
}

}  // namespace cuda
}  // namespace dawin_ext
