// CUDA softmax_entropy and entropy_coefficients. One pass over the logits: each thread keeps the
// (max, sum exp, sum exp * shifted logit) state of common/entropy_math.h over its elements (one
// 16-byte vector load = one block of the two-level scheme), and the states are merged across the
// warp with shuffles, and across warps through shared memory, with the same rescaling rule.
//   C <= kWarpRowMaxC: one warp per row (8 rows per 256-thread block), no shared memory.
//   larger C:          one 512-thread block per row.
// Rows may start at any element alignment (offset views): the first few elements up to the next
// 16-byte boundary and the tail are read one by one, the rest as vectors. A non-unit class stride
// is read element by element.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "cuda_utils.cuh"

namespace dawin_ext {

int cuda_runtime_version() { return CUDART_VERSION; }

namespace {

constexpr int64_t kWarpRowMaxC = 4096;
constexpr int kWarpRowThreads = 256;
constexpr int kBlockRowThreads = 512;

// This thread's state over its share of one row; `tid` in [0, kThreads) threads cooperate.
template <typename scalar_t>
__device__ __forceinline__ math::EntropyState row_state(const scalar_t* __restrict__ row, int64_t C, int64_t cs,
                                                        float scale, int tid, int kThreads) {
  math::EntropyState st = math::entropy_state_empty();
  if (cs == 1) {
    constexpr int V = cuda::VecWidth<scalar_t>::value;
    using P = cuda::Pack<scalar_t, V>;
    const auto addr = reinterpret_cast<uintptr_t>(row);
    int64_t head = static_cast<int64_t>((cuda::kVecBytes - addr % cuda::kVecBytes) % cuda::kVecBytes) /
                   static_cast<int64_t>(sizeof(scalar_t));
    head = head < C ? head : C;
    if (tid < head) math::entropy_state_push(st, cuda::to_float(row[tid]) * scale);
    const int64_t nvec = (C - head) / V;
    const P* __restrict__ vp = reinterpret_cast<const P*>(row + head);
    int64_t i = tid;
    // Two loads in flight per thread before their exps.
    for (; i + kThreads < nvec; i += 2 * static_cast<int64_t>(kThreads)) {
      const P p0 = vp[i];
      const P p1 = vp[i + kThreads];
      float z[2 * V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        z[j] = cuda::to_float(p0.v[j]) * scale;
        z[V + j] = cuda::to_float(p1.v[j]) * scale;
      }
      math::entropy_state_push_block(st, z, V);
      math::entropy_state_push_block(st, z + V, V);
    }
    if (i < nvec) {
      const P p0 = vp[i];
      float z[V];
#pragma unroll
      for (int j = 0; j < V; ++j) z[j] = cuda::to_float(p0.v[j]) * scale;
      math::entropy_state_push_block(st, z, V);
    }
    for (int64_t c = head + nvec * V + tid; c < C; c += kThreads) {
      math::entropy_state_push(st, cuda::to_float(row[c]) * scale);
    }
  } else {
    for (int64_t c = tid; c < C; c += kThreads) math::entropy_state_push(st, cuda::to_float(row[c * cs]) * scale);
  }
  return st;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarpRowThreads)
    entropy_warp_rows_kernel(const scalar_t* __restrict__ x, int64_t R, int64_t C, int64_t rs, int64_t cs, float scale,
                             float* __restrict__ out) {
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t warps_per_block = blockDim.x / cuda::kWarp;
  for (int64_t r = blockIdx.x * warps_per_block + threadIdx.x / cuda::kWarp; r < R;
       r += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    math::EntropyState st = row_state(x + r * rs, C, cs, scale, lane, cuda::kWarp);
    st = cuda::warp_merge(st);
    if (lane == 0) out[r] = math::entropy_state_finalize(st);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockRowThreads)
    entropy_block_rows_kernel(const scalar_t* __restrict__ x, int64_t R, int64_t C, int64_t rs, int64_t cs, float scale,
                              float* __restrict__ out) {
  __shared__ float scratch[3 * cuda::kWarp];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    math::EntropyState st = row_state(x + r * rs, C, cs, scale, threadIdx.x, blockDim.x);
    st = cuda::block_merge(st, scratch);
    if (threadIdx.x == 0) out[r] = math::entropy_state_finalize(st);
  }
}

// Entropy of each row of the strided [R, C] view x2d into out[0, R) on the current stream.
void launch_entropy_rows(const at::Tensor& x2d, float scale, float* out) {
  const int64_t R = x2d.size(0), C = x2d.size(1), rs = x2d.stride(0), cs = x2d.stride(1);
  if (R == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::dispatch_float_types(x2d.scalar_type(), "softmax_entropy_cuda", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
    if (C <= kWarpRowMaxC) {
      const int rows_per_block = kWarpRowThreads / cuda::kWarp;
      const int grid = cuda::grid_for(R, rows_per_block);
      entropy_warp_rows_kernel<scalar_t><<<grid, kWarpRowThreads, 0, stream>>>(xp, R, C, rs, cs, scale, out);
    } else {
      const int grid = cuda::grid_for(R, 1, 4);
      entropy_block_rows_kernel<scalar_t><<<grid, kBlockRowThreads, 0, stream>>>(xp, R, C, rs, cs, scale, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_cuda_input(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": expected a CUDA tensor, got one on ", t.device());
}

}  // namespace

at::Tensor softmax_entropy_cuda(const at::Tensor& logits, double temperature) {
  check_softmax_entropy_args(logits, temperature);
  check_cuda_input(logits, "softmax_entropy");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t C = logits.size(-1);
  auto out_sizes = logits.sizes().vec();
  out_sizes.pop_back();
  at::Tensor out = at::empty(out_sizes, logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const at::Tensor x2d = logits.reshape({-1, C});  // a strided view where possible
  launch_entropy_rows(x2d, static_cast<float>(1.0 / temperature), out.data_ptr<float>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> entropy_coefficients_cuda(const at::Tensor& logits,
                                                             c10::ArrayRef<double> temperatures,
                                                             bool offset_adjustment) {
  check_entropy_coefficients_args(logits, temperatures, offset_adjustment);
  check_cuda_input(logits, "entropy_coefficients");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t M = logits.size(0), B = logits.size(1), C = logits.size(2);
  at::Tensor entropies = at::empty({M, B}, logits.options().dtype(at::kFloat));
  if (B > 0) {
    const at::Tensor x2d = logits.reshape({M * B, C});
    float* out = entropies.data_ptr<float>();
    // One launch per model (M is small): each has its own temperature.
    for (int64_t m = 0; m < M; ++m) {
      const float scale = temperatures.empty() ? 1.f : static_cast<float>(1.0 / temperatures[m]);
      launch_entropy_rows(x2d.narrow(0, m * B, B), scale, out + m * B);
    }
  }
  return {coefficients_from_entropies(entropies, offset_adjustment), entropies};
}

}  // namespace dawin_ext

TORCH_LIBRARY_IMPL(dawin_ext, CUDA, m) {
  m.impl("softmax_entropy", &dawin_ext::softmax_entropy_cuda);
  m.impl("entropy_coefficients", &dawin_ext::entropy_coefficients_cuda);
}
