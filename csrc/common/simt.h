// The thread-level vocabulary of the CUDA kernels, written so that it compiles for the GPU and for
// the host: vector packs, alignment, element conversion, grid sizing, grid-stride indexing, and the
// warp / block merge of the softmax-entropy state.
//
// The CUDA kernels (cuda/*.cu) are thin __global__ wrappers that read threadIdx / blockIdx and call
// per-thread functions in common/*_kernel.h. The CPU grid emulator (cpu/cuda_emulation.cpp) calls
// the same functions for every thread of the same grid, one thread after another, so the CPU tests
// check the kernels' own index, alignment and vector/scalar decisions.
//
// Cross-thread merges go through one small interface, `warp_merge(W)` below: W is one value per
// lane. On the GPU a W is the lane's own register and shfl_xor is __shfl_xor_sync; on the host a W
// is a HostWarp holding all 32 lanes and shfl_xor permutes the array. Both run the same butterfly
// (offsets 16, 8, 4, 2, 1; own state first in every merge).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "entropy_math.h"
#include "hd.h"

namespace dawin_ext {
namespace simt {

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
DAWIN_HD float to_float(T x) {
  return static_cast<float>(x);
}

DAWIN_HD bool is_aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// Grid size for a grid-stride loop over `work` items with `per_block` items per block: enough
// blocks to fill `sms` multiprocessors `blocks_per_sm` times over, never more than there is work.
inline int grid_size(int64_t work, int64_t per_block, int64_t sms, int blocks_per_sm) {
  const int64_t need = (work + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(need, sms * blocks_per_sm)));
}

// Calls f(scalar_t{}) for the dtypes the kernels take (fp32, fp16, bf16); the argument checks
// have already rejected every other dtype, so reaching default is a bug. Host code.
template <typename F>
void dispatch_float_types(c10::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case c10::kFloat:
      return f(float{});
    case c10::kHalf:
      return f(c10::Half{});
    case c10::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

// A grid-stride loop over items: thread `tid` of block `block` starts at grid_stride_first and
// steps by grid_stride_step (grid blocks of `threads` threads).
DAWIN_HD int64_t grid_stride_first(int64_t block, int threads, int tid) {
  return block * static_cast<int64_t>(threads) + tid;
}
DAWIN_HD int64_t grid_stride_step(int64_t grid, int threads) { return grid * static_cast<int64_t>(threads); }

// ---------------------------------------------------------------------------------------------
// Cross-thread merges of math::EntropyState.
// ---------------------------------------------------------------------------------------------

// One lane's merge step: own state first, partner second (the order matters for rounding).
DAWIN_HD math::EntropyState merge_lanes(const math::EntropyState& own, const math::EntropyState& partner) {
  return math::entropy_state_merge(own, partner);
}

#if defined(__CUDACC__) || defined(__HIPCC__)
// GPU lanes: the partner's state comes through the shuffle network.
__device__ __forceinline__ math::EntropyState shfl_xor(const math::EntropyState& st, int offset) {
  math::EntropyState other;
  other.m = __shfl_xor_sync(kFullMask, st.m, offset);
  other.s = __shfl_xor_sync(kFullMask, st.s, offset);
  other.t = __shfl_xor_sync(kFullMask, st.t, offset);
  return other;
}
#endif

// Host lanes: all 32 lanes of one warp, stepped together as the hardware steps them.
template <typename T>
struct HostWarp {
  T lane[kWarp];
};

template <typename T>
inline HostWarp<T> shfl_xor(const HostWarp<T>& w, int offset) {
  HostWarp<T> r;
  for (int l = 0; l < kWarp; ++l) r.lane[l] = w.lane[l ^ offset];
  return r;
}

template <typename T>
inline HostWarp<T> merge_lanes(const HostWarp<T>& own, const HostWarp<T>& partner) {
  HostWarp<T> r;
  for (int l = 0; l < kWarp; ++l) r.lane[l] = merge_lanes(own.lane[l], partner.lane[l]);
  return r;
}

// Merges the states of all 32 lanes of a warp (butterfly: every lane ends with the merged state).
template <typename W>
DAWIN_HD W warp_merge(W st) {
  DAWIN_UNROLL
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) st = merge_lanes(st, shfl_xor(st, offset));
  return st;
}

// The block merge is two warp butterflies around one exchange through shared memory: every warp
// merges its lanes, lane 0 of warp w publishes its state into scratch (3 * 32 floats), and after
// the barrier warp 0 gathers the published states (empty beyond the last warp) and merges again.
// The result is valid in thread 0. The steps are shared; cuda_utils.cuh's block_merge puts the
// barriers between them, the emulator runs each step for every thread before the next.
DAWIN_HD void block_merge_publish(const math::EntropyState& warp_state, int lane, int warp, float* scratch) {
  if (lane == 0) {
    scratch[warp] = warp_state.m;
    scratch[kWarp + warp] = warp_state.s;
    scratch[2 * kWarp + warp] = warp_state.t;
  }
}

DAWIN_HD math::EntropyState block_merge_gather(int lane, int warps, const float* scratch) {
  return lane < warps ? math::EntropyState{scratch[lane], scratch[kWarp + lane], scratch[2 * kWarp + lane]}
                      : math::entropy_state_empty();
}

}  // namespace simt
}  // namespace dawin_ext
