// CUDA samplewise_lora: shrink and expand through cuBLAS (ATen's mm / addmm_), and between them the per-sample
// scaling of the rank blocks, one thread per element (common/samplewise_lora_kernel.h, shared with the CPU kernel).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common/kernel_host.h"
#include "../common/samplewise_lora_kernel.h"
#include "../ops.h"
#include "cuda_utils.cuh"

namespace dawin_ext {
namespace {

namespace slk = kernels::samplewise_lora;

template <typename scalar_t>
__global__ void __launch_bounds__(slk::kThreads)
    samplewise_lora_scale_kernel(scalar_t* __restrict__ h, const float* __restrict__ c, int64_t total, int64_t M,
                                 int64_t S, int64_t R) {
  for (int64_t idx = simt::grid_stride_first(blockIdx.x, blockDim.x, threadIdx.x); idx < total;
       idx += simt::grid_stride_step(gridDim.x, blockDim.x)) {
    slk::scale_element<scalar_t>(h, c, M, S, R, idx);
  }
}

}  // namespace

at::Tensor samplewise_lora_cuda(const at::Tensor& input, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const at::Tensor& coefficients, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias) {
  check_samplewise_lora_args(input, lora_a, lora_b, coefficients, weight, bias);
  TORCH_CHECK_VALUE(input.is_cuda(), "samplewise_lora: expected CUDA tensors, got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t OUT = lora_b.size(1);
  const int64_t S = lora_a.size(0), R = lora_a.size(1);
  const kernels::LoraShape shape = kernels::samplewise_lora_shape(input, OUT);
  const int64_t rows = shape.rows;
  if (rows == 0) return at::empty(shape.out_shape, input.options());
  at::Tensor out2d;
  at::Tensor h = samplewise_lora_base_and_shrink(input, lora_a, lora_b, weight, bias, out2d);
  const int64_t M = shape.per_sample, total = rows * S * R;
  if (total > 0) {
    const at::Tensor c = coefficients.to(at::kFloat).contiguous();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    simt::dispatch_float_types(h.scalar_type(), "samplewise_lora_cuda", [&](auto tag) {
      using scalar_t = decltype(tag);
      const int grid = simt::grid_size(total, slk::kThreads, cuda::current_sms(), 8);
      samplewise_lora_scale_kernel<scalar_t>
          <<<grid, slk::kThreads, 0, stream>>>(h.data_ptr<scalar_t>(), c.const_data_ptr<float>(), total, M, S, R);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    samplewise_lora_expand(h, lora_b, out2d);
  }
  return out2d.view(shape.out_shape);
}

}  // namespace dawin_ext

TORCH_LIBRARY_IMPL(dawin_ext, CUDA, m) { m.impl("samplewise_lora", &dawin_ext::samplewise_lora_cuda); }
