// CUDA samplewise_linear: out[b] = x[b] @ (sum_s c[b, s] W_s)^T + sum_s c[b, s] bias_s.
//
// On a GPU the GEMMs run on tensor cores and forming per-sample weights would cost a pass over
// B * S * OUT * IN elements of memory, so the CUDA path computes the S partial outputs x @ W_s^T with
// cuBLAS (one GEMM per source, reading W_s^T in place when that view is contiguous) and blends them
// per sample in one kernel that also adds the merged bias. Same schema and result as the CPU op
// (up to rounding order); the blend uses math::blend_dot, the CPU kernels' accumulation order. The
// blend kernel's per-thread work is in common/samplewise_linear_kernel.h, which the CPU grid
// emulator (cpu/cuda_emulation.cpp) runs too.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../common/kernel_host.h"
#include "../common/samplewise_linear_kernel.h"
#include "../ops.h"
#include "cuda_utils.cuh"

namespace dawin_ext {
namespace {

namespace slk = kernels::samplewise_linear;

template <typename scalar_t>
__global__ void __launch_bounds__(slk::kThreads)
    blend_partials_kernel(const scalar_t* __restrict__ partial, const scalar_t* __restrict__ bias,
                          const float* __restrict__ c, scalar_t* __restrict__ out, int64_t rows, int64_t M, int64_t OUT,
                          int S) {
  for (int64_t i = simt::grid_stride_first(blockIdx.x, blockDim.x, threadIdx.x); i < rows * OUT;
       i += simt::grid_stride_step(gridDim.x, blockDim.x)) {
    slk::blend_partials_element(partial, bias, c, out, rows, M, OUT, S, i);
  }
}

}  // namespace

at::Tensor samplewise_linear_cuda(const at::Tensor& input, const at::Tensor& weights,
                                  const std::optional<at::Tensor>& biases, const at::Tensor& coefficients) {
  check_samplewise_linear_args(input, weights, biases, coefficients);
  TORCH_CHECK_VALUE(input.is_cuda(), "samplewise_linear: expected CUDA tensors, got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const kernels::LinearPartials p = kernels::samplewise_linear_partials(input, weights, biases, coefficients);
  at::Tensor out = p.out;
  if (out.numel() == 0) return out;
  const int64_t rows = p.rows, M = p.per_sample, OUT = p.out_features, S = p.num_sources;
  const at::Tensor &partial = p.partial, &c = p.coefficients, &bias = p.bias;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  simt::dispatch_float_types(input.scalar_type(), "samplewise_linear_cuda", [&](auto tag) {
    using scalar_t = decltype(tag);
    const int grid = simt::grid_size(rows * OUT, slk::kThreads, cuda::current_sms(), 8);
    blend_partials_kernel<scalar_t><<<grid, slk::kThreads, 0, stream>>>(
        partial.const_data_ptr<scalar_t>(), biases ? bias.const_data_ptr<scalar_t>() : nullptr,
        c.const_data_ptr<float>(), out.data_ptr<scalar_t>(), rows, M, OUT, static_cast<int>(S));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace dawin_ext

TORCH_LIBRARY_IMPL(dawin_ext, CUDA, m) { m.impl("samplewise_linear", &dawin_ext::samplewise_linear_cuda); }
