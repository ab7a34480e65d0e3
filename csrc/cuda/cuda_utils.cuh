// CUDA-only helpers for the dawin_ext kernels: the block merge's barriers and the device's launch
// sizing. Everything a thread computes lives in common/simt.h and
// common/*_kernel.h, which the CPU grid emulator (cpu/cuda_emulation.cpp) runs as well.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/simt.h"

namespace dawin_ext {
namespace cuda {

// Merges the states of all threads of a block (blockDim.x a multiple of 32, at most 1024) with the
// shared steps of simt.h. The result is valid in thread 0. `scratch` holds 3 * 32 floats of shared
// memory; the block synchronizes before returning so that scratch can be reused.
__device__ __forceinline__ math::EntropyState block_merge(math::EntropyState st, float* scratch) {
  const int lane = threadIdx.x % simt::kWarp;
  const int warp = threadIdx.x / simt::kWarp;
  const int warps = blockDim.x / simt::kWarp;
  st = simt::warp_merge(st);
  simt::block_merge_publish(st, lane, warp, scratch);
  __syncthreads();
  if (warp == 0) st = simt::warp_merge(simt::block_merge_gather(lane, warps, scratch));
  __syncthreads();
  return st;
}

// Multiprocessors of the current device, for simt::grid_size.
inline int64_t current_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace cuda
}  // namespace dawin_ext
