// CPU samplewise_depthwise_conv2d: each sample's mixed taps and bias ([B, T + 1, C] fp32, the same entries the CUDA
// mix kernel computes), then the vectorized channels-last rows kernel of cpu_kernels_impl.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/kernel_host.h"
#include "../common/samplewise_depthwise_kernel.h"
#include "../ops.h"
#include "cpu_kernels.h"

namespace dawin_ext {

namespace dwk = kernels::depthwise;

at::Tensor samplewise_depthwise_conv2d_cpu(const at::Tensor& input, const at::Tensor& weights,
                                           const std::optional<at::Tensor>& biases, const at::Tensor& coefficients,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef dilation) {
  const dwk::Geometry g =
      check_samplewise_depthwise_args(input, weights, biases, coefficients, stride, padding, dilation);
  at::Tensor out = kernels::depthwise_output(input, g);
  if (out.numel() == 0) return out;
  // The mix reads the weights as [S, T, C] fp32 rows (a copy of S * T * C entries unless they are stored so, as
  // dawin_ext.exact keeps them) and writes the same table entries as the CUDA mix kernel.
  const at::Tensor coef = coefficients.to(at::kFloat).contiguous();
  const at::Tensor weights_t = weights.permute({0, 3, 4, 1, 2}).to(at::kFloat).contiguous();
  const at::Tensor bias_t = biases ? biases->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor mixed = at::empty({g.B, g.taps() + 1, g.C}, input.options().dtype(at::kFloat));
  // The rows kernel reads fp32 channels-last: a channels-last fp32 input is used in place; any other input is
  // converted once (counted in the op's time). fp16/bf16 outputs are rounded once from the fp32 result.
  const at::Tensor x = input.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out_f = input.scalar_type() == at::kFloat ? out : at::empty_like(out, out.options().dtype(at::kFloat));
  const cpu::DepthwiseArgs args{weights_t.const_data_ptr<float>(),
                                biases ? bias_t.const_data_ptr<float>() : nullptr,
                                coef.const_data_ptr<float>(),
                                mixed.data_ptr<float>(),
                                x.const_data_ptr<float>(),
                                out_f.data_ptr<float>(),
                                g};
  at::parallel_for(0, g.B * (g.taps() + 1), std::max<int64_t>(1, 16384 / (g.C * g.S)),
                   [&](int64_t r0, int64_t r1) { cpu::depthwise_mix_rows(args, r0, r1); });
  const int64_t per_row = std::max<int64_t>(1, g.OW * g.C * g.taps());
  at::parallel_for(0, g.B * g.OH, std::max<int64_t>(1, 65536 / per_row),
                   [&](int64_t r0, int64_t r1) { cpu::depthwise_rows(args, r0, r1); });
  if (!out_f.is_same(out)) out.copy_(out_f);
  return out;
}

}  // namespace dawin_ext
