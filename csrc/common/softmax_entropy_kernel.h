// Per-thread work and launch decisions of the CUDA softmax_entropy kernels (cuda/softmax_entropy_cuda.cu),
// shared with their CPU grid emulation (cpu/cuda_emulation.cpp).
//
// Each thread keeps the (max, sum exp, sum exp * shifted logit) state of entropy_math.h over its
// elements (one 16-byte vector load = one block of the two-level scheme); the states are merged
// across the warp with shuffles and across warps through shared memory (simt.h).
//   C <= kWarpRowMaxC: one warp per row (8 rows per 256-thread block), no shared memory.
//   larger C:          one 512-thread block per row.
// Rows may start at any element alignment (offset views): the first few elements up to the next
// 16-byte boundary (the head) and the tail are read one by one, the rest as vectors. A non-unit
// class stride is read element by element.
#pragma once

#include <cstdint>

#include "entropy_math.h"
#include "hd.h"
#include "simt.h"

namespace dawin_ext {
namespace kernels {
namespace entropy {

constexpr int64_t kWarpRowMaxC = 4096;
constexpr int kWarpRowThreads = 256;
constexpr int kBlockRowThreads = 512;

// Elements of a unit-stride row read one by one before the first 16-byte boundary.
template <typename scalar_t>
DAWIN_HD int64_t row_head(const scalar_t* row, int64_t C) {
  const auto addr = reinterpret_cast<uintptr_t>(row);
  const int64_t head = static_cast<int64_t>((simt::kVecBytes - addr % simt::kVecBytes) % simt::kVecBytes) /
                       static_cast<int64_t>(sizeof(scalar_t));
  return head < C ? head : C;
}

// This thread's state over its share of one row; `tid` in [0, threads) threads cooperate.
template <typename scalar_t>
DAWIN_HD math::EntropyState row_state(const scalar_t* __restrict__ row, int64_t C, int64_t cs, float scale, int tid,
                                      int threads) {
  math::EntropyState st = math::entropy_state_empty();
  if (cs == 1) {
    constexpr int V = simt::VecWidth<scalar_t>::value;
    using P = simt::Pack<scalar_t, V>;
    const int64_t head = row_head(row, C);
    if (tid < head) math::entropy_state_push(st, simt::to_float(row[tid]) * scale);
    const int64_t nvec = (C - head) / V;
    const P* __restrict__ vp = reinterpret_cast<const P*>(row + head);
    int64_t i = tid;
    // Two loads in flight per thread before their exps.
    for (; i + threads < nvec; i += 2 * static_cast<int64_t>(threads)) {
      const P p0 = vp[i];
      const P p1 = vp[i + threads];
      float z[2 * V];
      DAWIN_UNROLL
      for (int j = 0; j < V; ++j) {
        z[j] = simt::to_float(p0.v[j]) * scale;
        z[V + j] = simt::to_float(p1.v[j]) * scale;
      }
      math::entropy_state_push_block(st, z, V);
      math::entropy_state_push_block(st, z + V, V);
    }
    if (i < nvec) {
      const P p0 = vp[i];
      float z[V];
      DAWIN_UNROLL
      for (int j = 0; j < V; ++j) z[j] = simt::to_float(p0.v[j]) * scale;
      math::entropy_state_push_block(st, z, V);
    }
    for (int64_t c = head + nvec * V + tid; c < C; c += threads) {
      math::entropy_state_push(st, simt::to_float(row[c]) * scale);
    }
  } else {
    for (int64_t c = tid; c < C; c += threads) math::entropy_state_push(st, simt::to_float(row[c * cs]) * scale);
  }
  return st;
}

// Rows of the warp-per-row kernel: warp `warp` of block `block` takes rows first, first + step, ...
DAWIN_HD int64_t warp_rows_first(int64_t block, int warp, int warps_per_block) {
  return block * warps_per_block + warp;
}
DAWIN_HD int64_t warp_rows_step(int64_t grid, int warps_per_block) { return grid * warps_per_block; }

// Which kernel, how many blocks of how many threads, for R rows of C classes on `sms`
// multiprocessors. Host code, shared by the launch and the emulator.
struct LaunchConfig {
  bool warp_rows;  // entropy_warp_rows_kernel, else entropy_block_rows_kernel
  int grid;
  int threads;
};

inline LaunchConfig launch_config(int64_t R, int64_t C, int64_t sms) {
  if (C <= kWarpRowMaxC) {
    return {true, simt::grid_size(R, kWarpRowThreads / simt::kWarp, sms, 8), kWarpRowThreads};
  }
  return {false, simt::grid_size(R, 1, sms, 4), kBlockRowThreads};
}

}  // namespace entropy
}  // namespace kernels
}  // namespace dawin_ext
