// CUDA samplewise_depthwise_conv2d: one kernel fills each sample's mixed taps and bias ([B, T + 1, C] fp32), a second
// computes one channels-last output element per thread (consecutive threads: consecutive channels, so the input and
// table reads coalesce). The per-thread work is in common/samplewise_depthwise_kernel.h, which the CPU kernel and the
// CPU grid emulator (cpu/cuda_emulation.cpp) share.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/kernel_host.h"
#include "../common/samplewise_depthwise_kernel.h"
#include "../ops.h"
#include "cuda_utils.cuh"

namespace dawin_ext {
namespace {

namespace dwk = kernels::depthwise;

template <typename scalar_t>
__global__ void __launch_bounds__(dwk::kThreads)
    depthwise_mix_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ biases, dwk::SourceStrides st,
                         const float* __restrict__ coef, dwk::Geometry g, float* __restrict__ mixed, int64_t total) {
  for (int64_t idx = simt::grid_stride_first(blockIdx.x, blockDim.x, threadIdx.x); idx < total;
       idx += simt::grid_stride_step(gridDim.x, blockDim.x)) {
    mixed[idx] = dwk::mixed_table_entry(w, biases, st, coef, g, idx);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(dwk::kThreads)
    depthwise_conv_kernel(const scalar_t* __restrict__ x, const float* __restrict__ mixed, dwk::Geometry g,
                          scalar_t* __restrict__ out, int64_t total) {
  for (int64_t idx = simt::grid_stride_first(blockIdx.x, blockDim.x, threadIdx.x); idx < total;
       idx += simt::grid_stride_step(gridDim.x, blockDim.x)) {
    out[idx] = static_cast<scalar_t>(dwk::output_entry(x, mixed, g, idx));
  }
}

}  // namespace

at::Tensor samplewise_depthwise_conv2d_cuda(const at::Tensor& input, const at::Tensor& weights,
                                            const std::optional<at::Tensor>& biases, const at::Tensor& coefficients,
                                            c10::IntArrayRef stride, c10::IntArrayRef padding,
                                            c10::IntArrayRef dilation) {
  const dwk::Geometry g =
      check_samplewise_depthwise_args(input, weights, biases, coefficients, stride, padding, dilation);
  TORCH_CHECK_VALUE(input.is_cuda(), "samplewise_depthwise_conv2d: expected CUDA tensors, got input on ",
                    input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = kernels::depthwise_output(input, g);
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor coef = coefficients.to(at::kFloat).contiguous();
  at::Tensor mixed = at::empty({g.B, g.taps() + 1, g.C}, input.options().dtype(at::kFloat));
  const dwk::SourceStrides st = kernels::depthwise_source_strides(weights, biases);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = cuda::current_sms();
  simt::dispatch_float_types(input.scalar_type(), "samplewise_depthwise_conv2d_cuda", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* bp = biases ? biases->const_data_ptr<scalar_t>() : nullptr;
    const int64_t table = mixed.numel();
    depthwise_mix_kernel<scalar_t><<<simt::grid_size(table, dwk::kThreads, sms, 8), dwk::kThreads, 0, stream>>>(
        weights.const_data_ptr<scalar_t>(), bp, st, coef.const_data_ptr<float>(), g, mixed.data_ptr<float>(), table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = out.numel();
    depthwise_conv_kernel<scalar_t><<<simt::grid_size(total, dwk::kThreads, sms, 8), dwk::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), mixed.const_data_ptr<float>(), g, out.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace dawin_ext

TORCH_LIBRARY_IMPL(dawin_ext, CUDA, m) {
  m.impl("samplewise_depthwise_conv2d", &dawin_ext::samplewise_depthwise_conv2d_cuda);
}
