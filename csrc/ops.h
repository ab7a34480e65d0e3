// Declarations of the dawin_ext kernels. Each op has a CPU and (when built with CUDA) a CUDA
// implementation with the same signature; registration lives in registration.cpp (every schema, the CPU
// kernels and the private ops) and in the .cu files (CUDA kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/samplewise_depthwise_kernel.h"

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
// input [B, ..., IN], weights [S, OUT, IN], biases [S, OUT] or none, coefficients [B, S] ->
// out [B, ..., OUT] with out[b] = input[b] @ (sum_s c[b, s] W_s)^T + sum_s c[b, s] bias_s.
at::Tensor samplewise_linear_cpu(const at::Tensor& input, const at::Tensor& weights,
                                 const std::optional<at::Tensor>& biases, const at::Tensor& coefficients);
// input [B, ..., IN], lora_a [S, R, IN], lora_b [S, OUT, R], coefficients [B, S], weight [OUT, IN] or none,
// bias [OUT] or none -> [B, ..., OUT] = x @ W^T + bias + sum_s c[b, s] * (x @ A_s^T) @ B_s^T per sample b.
at::Tensor samplewise_lora_cpu(const at::Tensor& input, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const at::Tensor& coefficients, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias);
// Device-independent halves of samplewise_lora (cpu/samplewise_lora_cpu.cpp): out2d = x @ W^T + bias (or bias, or
// zeros) and the returned shrink h = x @ [A_0; ...]^T [rows, S * R]; then out2d += h @ [B_0, ...]^T.
at::Tensor samplewise_lora_base_and_shrink(const at::Tensor& input, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias, at::Tensor& out2d, bool base = true);
void samplewise_lora_expand(const at::Tensor& h, const at::Tensor& lora_b, at::Tensor& out2d);
// input [B, C, H, W], weights [S, C, 1, KH, KW], biases [S, C] or none, coefficients [B, S] -> the depthwise
// convolution (groups = C, zero padding) of sample b with sum_s c[b, s] W_s and sum_s c[b, s] bias_s, channels-last
// [B, C, OH, OW] in input's dtype.
at::Tensor samplewise_depthwise_conv2d_cpu(const at::Tensor& input, const at::Tensor& weights,
                                           const std::optional<at::Tensor>& biases, const at::Tensor& coefficients,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef dilation);
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
at::Tensor samplewise_lora_cuda(const at::Tensor& input, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const at::Tensor& coefficients, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias);
at::Tensor samplewise_depthwise_conv2d_cuda(const at::Tensor& input, const at::Tensor& weights,
                                            const std::optional<at::Tensor>& biases, const at::Tensor& coefficients,
                                            c10::IntArrayRef stride, c10::IntArrayRef padding,
                                            c10::IntArrayRef dilation);
int cuda_runtime_version();
#endif

// Shared argument checks (checks.cpp); device-independent so both paths raise the same messages.
void check_softmax_entropy_args(const at::Tensor& logits, double temperature);
void check_entropy_coefficients_args(const at::Tensor& logits, c10::ArrayRef<double> temperatures,
                                     bool offset_adjustment);
void check_blend_args(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out);
// Two tensors whose memory ranges intersect (memory_overlaps): indices into the list, first < second;
// exact when both are the same view (data pointer, dtype, sizes and strides).
struct MemoryOverlap {
  int64_t first;
  int64_t second;
  bool exact;
};
// Every pair of tensors whose memory may intersect (byte ranges from the strides; tensors on different
// devices never do), except pairs of two read-only tensors (indices < num_read_only). One sort and sweep.
std::vector<MemoryOverlap> memory_overlaps(at::TensorList tensors, int64_t num_read_only);
// Overlap analysis of one blend_ call over all (output, source) and (output, output) pairs, before any
// work. The only sharing allowed is an output that is exactly the source tensor of its own index (an
// in-place blend: every kernel reads an element of all sources before it writes that element of any
// output); anything else raises ValueError naming the tensors and clusters. Returns whether some output
// is such an in-place alias (kernels that re-read sources after writing outputs must not run then).
bool check_blend_aliasing(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out);
void check_sample_combine_args(const at::Tensor& stacked, const at::Tensor& weights);
void check_samplewise_linear_args(const at::Tensor& input, const at::Tensor& weights,
                                  const std::optional<at::Tensor>& biases, const at::Tensor& coefficients);
void check_samplewise_lora_args(const at::Tensor& input, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const at::Tensor& coefficients, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias);
// Checks samplewise_depthwise_conv2d's arguments and returns the convolution's geometry.
kernels::depthwise::Geometry check_samplewise_depthwise_args(const at::Tensor& input, const at::Tensor& weights,
                                                             const std::optional<at::Tensor>& biases,
                                                             const at::Tensor& coefficients, c10::IntArrayRef stride,
                                                             c10::IntArrayRef padding, c10::IntArrayRef dilation);
// coefficients_from_entropies.cpp. Coefficients from entropies [M, B] (any device): softmax over models of -H, or
// DaWin's offset adjustment for M == 2. Composite of ATen ops, shared by the CPU and CUDA paths.
at::Tensor coefficients_from_entropies(const at::Tensor& entropies, bool offset_adjustment);

// CPU grid emulation of the CUDA kernels (cpu/cuda_emulation.cpp), behind test-only private ops.
namespace emulation {
std::tuple<at::Tensor, std::string> emulate_softmax_entropy(const at::Tensor& logits, double temperature,
                                                            int64_t num_sms);
std::string emulate_blend(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out,
                          bool outputs_overlap_sources, c10::string_view kernel);
std::tuple<at::Tensor, std::string> emulate_sample_combine(const at::Tensor& stacked, const at::Tensor& weights,
                                                           int64_t num_sms);
at::Tensor emulate_samplewise_linear(const at::Tensor& input, const at::Tensor& weights,
                                     const std::optional<at::Tensor>& biases, const at::Tensor& coefficients,
                                     int64_t num_sms);
at::Tensor emulate_samplewise_depthwise(const at::Tensor& input, const at::Tensor& weights,
                                        const std::optional<at::Tensor>& biases, const at::Tensor& coefficients,
                                        c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                        int64_t num_sms);
}  // namespace emulation

}  // namespace dawin_ext
