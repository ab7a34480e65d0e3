// CUDA per-sample combine of S partial outputs: out[b, m, n] = sum_s w[b, s] * x[b, m, s, n],
// accumulated in fp32 in the same order as the CPU kernel. Each thread owns one 16-byte group of
// output elements (when N and the pointers allow it, else one element) and reads its S inputs once.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "cuda_utils.cuh"

namespace dawin_ext {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    sample_combine_kernel(const scalar_t* __restrict__ x, const float* __restrict__ w, scalar_t* __restrict__ out,
                          int64_t rows, int64_t M, int64_t S, int64_t N) {
  using P = cuda::Pack<scalar_t, V>;
  const int64_t groups = N / V;  // N is a multiple of V
  const int64_t total = rows * groups;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / groups;
    const int64_t g = idx - r * groups;
    const float* wb = w + (r / M) * S;
    const scalar_t* xr = x + r * S * N + g * V;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      const P p = *reinterpret_cast<const P*>(xr + s * N);
      const float ws = wb[s];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = fmaf(ws, cuda::to_float(p.v[j]), acc[j]);
    }
    P o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = static_cast<scalar_t>(acc[j]);
    *reinterpret_cast<P*>(out + r * N + g * V) = o;
  }
}

}  // namespace

at::Tensor sample_combine_cuda(const at::Tensor& stacked, const at::Tensor& weights) {
  check_sample_combine_args(stacked, weights);
  TORCH_CHECK_VALUE(stacked.is_cuda(), "sample_combine: expected CUDA tensors, got stacked on ", stacked.device());
  const c10::cuda::CUDAGuard guard(stacked.device());
  const int64_t B = stacked.size(0), M = stacked.size(1), S = stacked.size(2), N = stacked.size(3);
  const at::Tensor x = stacked.contiguous();
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, M, N}, stacked.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::dispatch_float_types(x.scalar_type(), "sample_combine_cuda", [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int V = cuda::VecWidth<scalar_t>::value;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* wp = w.const_data_ptr<float>();
    const bool vec_ok = N % V == 0 && cuda::is_aligned(xp, cuda::kVecBytes) && cuda::is_aligned(op, cuda::kVecBytes);
    if (vec_ok) {
      const int grid = cuda::grid_for(B * M * (N / V), kThreads);
      sample_combine_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(xp, wp, op, B * M, M, S, N);
    } else {
      const int grid = cuda::grid_for(B * M * N, kThreads);
      sample_combine_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(xp, wp, op, B * M, M, S, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace dawin_ext

TORCH_LIBRARY_IMPL(dawin_ext, CUDA, m) { m.impl("sample_combine", &dawin_ext::sample_combine_cuda); }
