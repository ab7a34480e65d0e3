// CPU samplewise_lora: a linear layer plus S LoRA adapters mixed per sample,
//   out[b] = x[b] @ W^T + bias + sum_s c[b, s] * (x[b] @ A_s^T) @ B_s^T,
// without ever forming a merged [OUT, IN] weight (see common/samplewise_lora_kernel.h for the structure).
// The base GEMM goes through samplewise_linear's brgemm (fp32, weight in [IN, OUT] storage) or ATen; shrink,
// per-sample scaling of the rank blocks and expand are one fused pass per group of rows (cpu::lora_rows).
// The argument checks are here too and are shared with the CUDA kernel, so both devices raise the same messages.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "../common/kernel_host.h"
#include "../common/samplewise_lora_kernel.h"
#include "../ops.h"
#include "cpu_kernels.h"

namespace dawin_ext {

namespace {
// Rows per sample from which the base GEMM goes through samplewise_linear's brgemm (below it, at::mm).
constexpr int64_t kMinRowsForBrgemm = 6;

// x @ W^T + bias (or bias, or zeros) as a fresh [rows, OUT] tensor.
at::Tensor base_output(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, int64_t OUT) {
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor x2 = x.reshape({rows, x.size(-1)});
  if (weight.has_value()) return bias.has_value() ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t());
  // A fresh tensor even for the bias: expand(...).contiguous() can return a view of the caller's bias (one row),
  // which the expand step would then modify in place.
  at::Tensor out = bias.has_value() ? at::empty({rows, OUT}, x.options()) : at::zeros({rows, OUT}, x.options());
  if (bias.has_value()) out.copy_(bias->unsqueeze(0));
  return out;
}
}  // namespace

void check_samplewise_lora_args(const at::Tensor& input, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const at::Tensor& coefficients, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "samplewise_lora: input must be [B, ..., in_features], got shape ",
                    input.sizes());
  TORCH_CHECK_TYPE(
      input.scalar_type() == at::kFloat || input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16,
      "samplewise_lora: input must be float32, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK_VALUE(lora_a.dim() == 3, "samplewise_lora: lora_a must be [S adapters, rank, in_features], got shape ",
                    lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.dim() == 3, "samplewise_lora: lora_b must be [S adapters, out_features, rank], got shape ",
                    lora_b.sizes());
  const int64_t S = lora_a.size(0), R = lora_a.size(1), IN = input.size(-1);
  TORCH_CHECK_VALUE(lora_a.size(2) == IN, "samplewise_lora: lora_a has in_features ", lora_a.size(2), " but input has ",
                    IN);
  TORCH_CHECK_VALUE(lora_b.size(0) == S && lora_b.size(2) == R, "samplewise_lora: lora_b shape ", lora_b.sizes(),
                    " does not match lora_a ", lora_a.sizes(), " (expected [", S, ", out_features, ", R, "])");
  const int64_t OUT = lora_b.size(1);
  TORCH_CHECK_VALUE(coefficients.dim() == 2 && coefficients.size(0) == input.size(0) && coefficients.size(1) == S,
                    "samplewise_lora: coefficients must be [B, S] = [", input.size(0), ", ", S, "], got shape ",
                    coefficients.sizes());
  TORCH_CHECK_TYPE(coefficients.is_floating_point(), "samplewise_lora: coefficients must be floating point, got ",
                   coefficients.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"lora_a", &lora_a}, {"lora_b", &lora_b}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == input.scalar_type(), "samplewise_lora: ", name, " are ", t->scalar_type(),
                     " but input is ", input.scalar_type());
    TORCH_CHECK_VALUE(t->device() == input.device(), "samplewise_lora: ", name, " are on ", t->device(),
                      " but input is on ", input.device());
  }
  TORCH_CHECK_VALUE(coefficients.device() == input.device(), "samplewise_lora: coefficients are on ",
                    coefficients.device(), " but input is on ", input.device());
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 2 && weight->size(0) == OUT && weight->size(1) == IN,
                      "samplewise_lora: weight must be [out_features, in_features] = [", OUT, ", ", IN, "], got shape ",
                      weight->sizes());
    TORCH_CHECK_TYPE(weight->scalar_type() == input.scalar_type(), "samplewise_lora: weight is ", weight->scalar_type(),
                     " but input is ", input.scalar_type());
    TORCH_CHECK_VALUE(weight->device() == input.device(), "samplewise_lora: weight is on ", weight->device(),
                      " but input is on ", input.device());
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == OUT, "samplewise_lora: bias must be [out_features] = [", OUT,
                      "], got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), "samplewise_lora: bias is ", bias->scalar_type(),
                     " but input is ", input.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == input.device(), "samplewise_lora: bias is on ", bias->device(),
                      " but input is on ", input.device());
  }
}

at::Tensor samplewise_lora_base_and_shrink(const at::Tensor& input, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias, at::Tensor& out2d, bool base) {
  // out2d = x @ W^T + bias (or bias, or zeros) unless base is false (the caller made it), and returns the shrink
  // h = x @ [A_s]^T [rows, S*R]. Used by the CUDA kernel (cuBLAS handles the skinny shrink well); the CPU kernel
  // fuses shrink, scaling and expand instead.
  const int64_t IN = input.size(-1), OUT = lora_b.size(1);
  const int64_t S = lora_a.size(0), R = lora_a.size(1);
  const int64_t rows = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  const at::Tensor x2 = input.reshape({rows, IN});
  if (base) out2d = base_output(input, weight, bias, OUT);
  return at::mm(x2, lora_a.reshape({S * R, IN}).t());
}

void samplewise_lora_expand(const at::Tensor& h, const at::Tensor& lora_b, at::Tensor& out2d) {
  // out2d += h @ [B_0, ..., B_{S-1}]^T; free of copies when lora_b is stored as [S, R, OUT] (the layout
  // dawin_ext.samplewise_lora_factors builds).
  const int64_t S = lora_b.size(0), OUT = lora_b.size(1), R = lora_b.size(2);
  out2d.addmm_(h, lora_b.transpose(1, 2).reshape({S * R, OUT}));
}

at::Tensor samplewise_lora_cpu(const at::Tensor& input, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const at::Tensor& coefficients, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias) {
  check_samplewise_lora_args(input, lora_a, lora_b, coefficients, weight, bias);
  TORCH_CHECK_VALUE(input.device().is_cpu(), "samplewise_lora_cpu: expected CPU tensors, got input on ",
                    input.device());
  const int64_t B = input.size(0), OUT = lora_b.size(1);
  const int64_t S = lora_a.size(0), R = lora_a.size(1);
  const kernels::LoraShape shape = kernels::samplewise_lora_shape(input, OUT);
  const std::vector<int64_t>& out_shape = shape.out_shape;
  const int64_t rows = shape.rows;
  if (rows == 0) return at::empty(out_shape, input.options());
  const int64_t M = shape.per_sample, width = S * R;
  const at::Tensor x = input.contiguous();  // read by the base GEMM and the shrink: copy a strided input once
  at::Tensor out2d;
  if (weight.has_value() && weight->stride(0) == 1 && input.scalar_type() == at::kFloat && M >= kMinRowsForBrgemm &&
      samplewise_linear_has_brgemm()) {
    // The base GEMM through samplewise_linear with one source: oneDNN's brgemm, which on CPUs where it beats
    // at::mm's BLAS makes the base layer as fast as the dense exact engine's (a weight stored as [IN, OUT], as
    // the engine keeps it, is read in place; a plain [OUT, IN] weight takes at::mm rather than a copy per call).
    const at::Tensor ones = at::ones({B, 1}, input.options());
    const std::optional<at::Tensor> biases =
        bias.has_value() ? std::optional<at::Tensor>(bias->unsqueeze(0)) : std::nullopt;
    out2d = samplewise_linear_cpu(x, weight->unsqueeze(0), biases, ones).view({rows, OUT});
  } else {
    out2d = base_output(x, weight, bias, OUT);
  }
  if (width > 0 && x.size(-1) > 0) {
    // Shrink, scaling and expand fused per group of rows in fp32 (cpu::lora_rows, one copy per instruction set):
    // BLAS is slow on these skinny shapes (rows x IN by IN x S*R, with S*R ~ 16: measured 20x below its
    // large-GEMM rate on the 2-core dev VM), while A and Bt stay in L2 and each of their loads serves 4 rows.
    const at::Tensor c = coefficients.to(at::kFloat).contiguous();
    const at::Tensor a = lora_a.reshape({width, x.size(-1)}).to(at::kFloat).contiguous();
    // [S*R, OUT]: free in the factors' layout (lora_b stored as [S, R, OUT]).
    const at::Tensor bt = lora_b.transpose(1, 2).reshape({width, OUT}).to(at::kFloat).contiguous();
    const cpu::LoraRowsArgs args{x.scalar_type(),
                                 x.const_data_ptr(),
                                 a.const_data_ptr<float>(),
                                 bt.const_data_ptr<float>(),
                                 c.const_data_ptr<float>(),
                                 out2d.data_ptr(),
                                 M,
                                 x.size(-1),
                                 OUT,
                                 S,
                                 R};
    const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, width * (x.size(-1) + OUT)));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { cpu::lora_rows(args, r0, r1); });
  }
  return out2d.view(out_shape);
}

}  // namespace dawin_ext
