// CUDA per-sample combine of S partial outputs: out[b, m, n] = sum_s w[b, s] * x[b, m, s, n]. The
// per-thread work and the vector/scalar choice are in common/sample_combine_kernel.h, which the CPU
// grid emulator (cpu/cuda_emulation.cpp) runs too.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/sample_combine_kernel.h"
#include "../ops.h"
#include "cuda_utils.cuh"

namespace dawin_ext {
namespace {

namespace sck = kernels::sample_combine;

template <typename scalar_t, int V>
__global__ void __launch_bounds__(sck::kThreads)
    sample_combine_kernel(const scalar_t* __restrict__ x, const float* __restrict__ w, scalar_t* __restrict__ out,
                          int64_t rows, int64_t M, int64_t S, int64_t N) {
  const int64_t total = rows * (N / V);
  for (int64_t idx = simt::grid_stride_first(blockIdx.x, blockDim.x, threadIdx.x); idx < total;
       idx += simt::grid_stride_step(gridDim.x, blockDim.x)) {
    sck::combine_group<scalar_t, V>(x, w, out, M, S, N, idx);
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
  simt::dispatch_float_types(x.scalar_type(), "sample_combine_cuda", [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int V = simt::VecWidth<scalar_t>::value;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* wp = w.const_data_ptr<float>();
    const int64_t sms = cuda::current_sms();
    if (sck::use_vector_kernel(N, xp, op)) {
      const int grid = simt::grid_size(B * M * (N / V), sck::kThreads, sms, 8);
      sample_combine_kernel<scalar_t, V><<<grid, sck::kThreads, 0, stream>>>(xp, wp, op, B * M, M, S, N);
    } else {
      const int grid = simt::grid_size(B * M * N, sck::kThreads, sms, 8);
      sample_combine_kernel<scalar_t, 1><<<grid, sck::kThreads, 0, stream>>>(xp, wp, op, B * M, M, S, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace dawin_ext

TORCH_LIBRARY_IMPL(dawin_ext, CUDA, m) { m.impl("sample_combine", &dawin_ext::sample_combine_cuda); }
