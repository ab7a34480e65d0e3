// CPU samplewise_lora: a linear layer plus S LoRA adapters mixed per sample,
//   out[b] = x[b] @ W^T + bias + sum_s c[b, s] * (x[b] @ A_s^T) @ B_s^T,
// without ever forming a merged [OUT, IN] weight (see common/samplewise_lora_kernel.h for the structure).
// The shrink and expand are two GEMMs through ATen's BLAS; the per-sample scaling of the rank blocks between
// them is ours (at::parallel_for over rows; the inner loop is a contiguous multiply the compiler vectorises).
// The argument checks are here too and are shared with the CUDA kernel, so both devices raise the same messages.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "../common/samplewise_lora_kernel.h"
#include "../ops.h"

namespace dawin_ext {

namespace {
// samplewise_linear's brgemm path needs this many rows per sample (its kMinRowsForMixing).
constexpr int64_t kMinRowsForBrgemm = 6;
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
  // Shared by both devices: out2d = x @ W^T + bias (or bias, or zeros) unless base is false (the caller made it),
  // and returns h = x @ [A_s]^T [rows, S*R].
  const int64_t IN = input.size(-1), OUT = lora_b.size(1);
  const int64_t S = lora_a.size(0), R = lora_a.size(1);
  const int64_t rows = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  const at::Tensor x2 = input.reshape({rows, IN});
  if (!base) {
    // out2d already holds the base output
  } else if (weight.has_value()) {
    out2d = bias.has_value() ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t());
  } else if (bias.has_value()) {
    // A fresh tensor: expand(...).contiguous() can return a view of the caller's bias (one row), which the expand
    // step would then modify in place.
    out2d = at::empty({rows, OUT}, input.options());
    out2d.copy_(bias->unsqueeze(0));
  } else {
    out2d = at::zeros({x2.size(0), OUT}, input.options());
  }
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
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end() - 1);
  out_shape.push_back(OUT);
  const int64_t rows = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  if (rows == 0) return at::empty(out_shape, input.options());
  const int64_t M = rows / B, width = S * R;
  const at::Tensor x = input.contiguous();  // read by the base GEMM and the shrink: copy a strided input once
  at::Tensor out2d;
  at::Tensor h;
  if (weight.has_value() && input.scalar_type() == at::kFloat && M >= kMinRowsForBrgemm &&
      samplewise_linear_has_brgemm()) {
    // The base GEMM through samplewise_linear with one source: oneDNN's brgemm, which on CPUs where it beats
    // at::mm's BLAS makes the base layer as fast as the dense exact engine's (a weight stored as [IN, OUT], as
    // the engine keeps it, is read in place).
    const at::Tensor ones = at::ones({B, 1}, input.options());
    const std::optional<at::Tensor> biases =
        bias.has_value() ? std::optional<at::Tensor>(bias->unsqueeze(0)) : std::nullopt;
    out2d = samplewise_linear_cpu(x, weight->unsqueeze(0), biases, ones).view({rows, OUT});
    h = samplewise_lora_base_and_shrink(x, lora_a, lora_b, std::nullopt, std::nullopt, out2d, /*base=*/false);
  } else {
    h = samplewise_lora_base_and_shrink(x, lora_a, lora_b, weight, bias, out2d);
  }
  if (width > 0) {
    const at::Tensor c = coefficients.to(at::kFloat).contiguous();
    const float* cp = c.const_data_ptr<float>();
    simt::dispatch_float_types(h.scalar_type(), "samplewise_lora_cpu", [&](auto tag) {
      using scalar_t = decltype(tag);
      scalar_t* hp = h.data_ptr<scalar_t>();
      // A grain of rows worth ~32k entries keeps tiny problems on one thread.
      const int64_t grain = std::max<int64_t>(1, 32768 / width);
      at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) kernels::samplewise_lora::scale_row(hp + r * width, cp + (r / M) * S, S, R);
      });
    });
    samplewise_lora_expand(h, lora_b, out2d);
  }
  return out2d.view(out_shape);
}

}  // namespace dawin_ext
