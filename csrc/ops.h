// Declarations of the dawin_ext kernels. Each op has a CPU and (when built with CUDA) a CUDA
// implementation with the same signature; registration lives in registration.cpp (CPU) and in the
// .cu files (CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>
#include <vector>

namespace dawin_ext {

// H(softmax(logits / T)) along the last dim, fp32 output of shape logits.shape[:-1].
at::Tensor softmax_entropy_cpu(const at::Tensor& logits, double temperature);
// logits [M, B, C]; temperatures has M entries (or is empty for all ones).
// Returns (coefficients [B, M], entropies [M, B]).
std::tuple<at::Tensor, at::Tensor> entropy_coefficients_cpu(const at::Tensor& logits,
                                                            c10::ArrayRef<double> temperatures, bool offset_adjustment);
// sources: S * N tensors, source-major (sources[s * N + n]); out: K * N tensors, cluster-major.
// coefficients: [K, S]. out[k * N + n] = sum_s coefficients[k, s] * sources[s * N + n].
void blend_cpu(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out);
// stacked [B, M, S, N], weights [B, S] -> [B, M, N] with out[b, m, n] = sum_s w[b, s] * x[b, m, s, n].
at::Tensor sample_combine_cpu(const at::Tensor& stacked, const at::Tensor& weights);
// input [B, ..., K], weights [G, N, K], biases [G, N] or none, coefficients [B, G] ->
// out [B, ..., N] with out[b] = input[b] @ (sum_g c[b, g] W_g)^T + sum_g c[b, g] bias_g.
at::Tensor samplewise_linear_cpu(const at::Tensor& input, const at::Tensor& weights,
                                 const std::optional<at::Tensor>& biases, const at::Tensor& coefficients);
// Whether torch's oneDNN brgemm micro-kernel (samplewise_linear's fp32 fast path) works in this process.
bool samplewise_linear_has_brgemm();

#ifdef DAWIN_EXT_WITH_CUDA
at::Tensor softmax_entropy_cuda(const at::Tensor& logits, double temperature);
std::tuple<at::Tensor, at::Tensor> entropy_coefficients_cuda(const at::Tensor& logits,
                                                             c10::ArrayRef<double> temperatures,
                                                             bool offset_adjustment);
void blend_cuda(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out);
at::Tensor sample_combine_cuda(const at::Tensor& stacked, const at::Tensor& weights);
at::Tensor samplewise_linear_cuda(const at::Tensor& input, const at::Tensor& weights,
                                  const std::optional<at::Tensor>& biases, const at::Tensor& coefficients);
int cuda_runtime_version();
#endif

// Shared argument checks (checks.cpp); device-independent so both paths raise the same messages.
void check_softmax_entropy_args(const at::Tensor& logits, double temperature);
void check_entropy_coefficients_args(const at::Tensor& logits, c10::ArrayRef<double> temperatures,
                                     bool offset_adjustment);
void check_blend_args(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out);
void check_sample_combine_args(const at::Tensor& stacked, const at::Tensor& weights);
void check_samplewise_linear_args(const at::Tensor& input, const at::Tensor& weights,
                                  const std::optional<at::Tensor>& biases, const at::Tensor& coefficients);
// Coefficients from entropies [M, B] (any device): softmax over models of -H, or DaWin's offset
// adjustment for M == 2. Composite of ATen ops, shared by the CPU and CUDA paths.
at::Tensor coefficients_from_entropies(const at::Tensor& entropies, bool offset_adjustment);

}  // namespace dawin_ext
