// Raw-pointer CPU kernels for softmax_entropy, entropy_coefficients, sample_combine and blend (and
// blend's row kernel, which samplewise_linear uses), compiled once per CPU capability and picked at run
// time. This is the only per-ISA scheme of the extension: one set of copies, one dispatch table here.
//
// Why: at::vec::Vectorized<float> only becomes AVX2/AVX512 code when the translation unit defines
// CPU_CAPABILITY_AVX2/AVX512 and is compiled for those instruction sets; a plain extension build gets
// the scalar fallback. ATen solves this by compiling each kernel file several times with different
// flags. We do the same without needing per-file compiler flags in setup.py: cpu_kernels_impl.h
// holds the kernels once, and cpu_kernels_{default,avx2,avx512}.cpp each include it after
// `#pragma GCC target(...)` and CPU_CAPABILITY defines, in their own namespace. All other headers are
// included before the pragma, so their inline functions are compiled for the baseline ISA and no
// AVX code can leak into symbols shared with other translation units (Vectorized itself lives in
// the inline namespace at::vec::CPU_CAPABILITY, distinct per capability). level() picks the widest
// set that both torch's own choice (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY)
// and the CPU (__builtin_cpu_supports) allow, once per process.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

#include "../common/samplewise_depthwise_kernel.h"

namespace dawin_ext {
namespace cpu {

// Entropy of each row of a strided [rows, cols] view (strides in elements); row r is scaled by
// inv_temps[r / rows_per_group]. out has `rows` floats.
struct EntropyRowsArgs {
  at::ScalarType dtype;  // kFloat, kHalf or kBFloat16
  const void* data;
  int64_t rows, cols, row_stride, col_stride;
  const float* inv_temps;
  int64_t rows_per_group;
  float* out;
};

// out[b, m, n] = sum_s w[b, s] * x[b, m, s, n]; x contiguous [B, M, S, N], w contiguous fp32 [B, S],
// out contiguous [B, M, N] of x's dtype.
struct SampleCombineArgs {
  at::ScalarType dtype;
  const void* x;
  const float* w;
  void* out;
  int64_t B, M, S, N;
};

// blend: one work item is elements [begin, end) of tensor `tensor`, for all S sources and K clusters.
struct BlendItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// The whole blend_ call, built once by blend_cpu.cpp: S * N source and K * N output pointers, each
// tensor's dtype, the work items and the [K, S] coefficients in fp32 (for fp32/fp16/bf16) and fp64.
struct BlendPlan {
  int num_sources = 0;   // S
  int num_clusters = 0;  // K
  int64_t num_tensors = 0;
  bool stream = false;           // outputs far larger than the caches: non-temporal stores where aligned
  std::vector<const void*> src;  // [n * S + s]
  std::vector<void*> dst;        // [n * K + k]
  std::vector<at::ScalarType> dtypes;
  std::vector<BlendItem> items;
  std::vector<float> coef_f;   // [K * S]
  std::vector<double> coef_d;  // [K * S]

  const void* src_ptr(int64_t n, int s) const { return src[n * num_sources + s]; }
  void* dst_ptr(int64_t n, int k) const { return dst[n * num_clusters + k]; }
  template <typename acc_t>
  const acc_t* coef() const {
    if constexpr (sizeof(acc_t) == sizeof(double)) {
      return coef_d.data();
    } else {
      return coef_f.data();
    }
  }
};

// samplewise_lora's shrink -> scale -> expand for rows [r0, r1) (see common/samplewise_lora_kernel.h):
// h = A x_r ([S * R]), h[s * R + k] *= coef[(r / M) * S + s], out_r += Bt^T h, in fp32, out rounded once.
// x and out contiguous [rows, IN] / [rows, OUT] of `dtype`; a [S * R, IN] and bt [S * R, OUT] contiguous fp32.
struct LoraRowsArgs {
  at::ScalarType dtype;  // kFloat, kHalf or kBFloat16
  const void* x;
  const float* a;
  const float* bt;
  const float* coef;  // [B, S]
  void* out;
  int64_t M, IN, OUT, S, R;
};

// samplewise_depthwise_conv2d (see common/samplewise_depthwise_kernel.h). depthwise_mix_rows fills rows
// r = b * (T + 1) + t of the fp32 table `mixed` [B, T + 1, C] from weights_t (the S weights as contiguous fp32
// [S, T, C]), bias_t (contiguous fp32 [S, C], or null for no biases) and coef (fp32 [B, S]); depthwise_rows then
// computes output rows r = b * OH + oh from x (channels-last fp32 [B, C, H, W]) into out (channels-last fp32).
struct DepthwiseArgs {
  const float* weights_t;
  const float* bias_t;
  const float* coef;
  float* mixed;
  const float* x;
  float* out;
  kernels::depthwise::Geometry g;
};

enum class Level { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The instruction set the kernels run with in this process.
Level level();
const char* level_name(Level l);

#define DAWIN_EXT_DECLARE_CPU_KERNELS(ns)                                                                    \
  namespace ns {                                                                                             \
  void entropy_rows(const EntropyRowsArgs& args);                                                            \
  void sample_combine(const SampleCombineArgs& args);                                                        \
  void blend_items(const BlendPlan& plan, int64_t i0, int64_t i1);                                           \
  void blend_rows_f32(const float* src, int64_t source_stride, int64_t row_stride, const float* coef, int S, \
                      int64_t rows, int64_t cols, float* dst);                                               \
  void lora_rows(const LoraRowsArgs& args, int64_t r0, int64_t r1);                                          \
  void depthwise_mix_rows(const DepthwiseArgs& args, int64_t r0, int64_t r1);                                \
  void depthwise_rows(const DepthwiseArgs& args, int64_t r0, int64_t r1);                                    \
  }

DAWIN_EXT_DECLARE_CPU_KERNELS(isa_default)
DAWIN_EXT_DECLARE_CPU_KERNELS(isa_avx2)
DAWIN_EXT_DECLARE_CPU_KERNELS(isa_avx512)
#undef DAWIN_EXT_DECLARE_CPU_KERNELS

// Dispatch to level()'s implementation.
void entropy_rows(const EntropyRowsArgs& args);
void sample_combine(const SampleCombineArgs& args);
// Blends items [i0, i1) of the plan (serial: blend_cpu runs it inside its parallel loop).
void blend_items(const BlendPlan& plan, int64_t i0, int64_t i1);
// dst[r * cols + j] = sum_s coef[s] * src[s * source_stride + r * row_stride + j] for r < rows, j < cols (fp32),
// with blend's kernel and accumulation order. Serial: call it inside a parallel region. samplewise_linear
// forms one sample's merged weight block with it.
void blend_rows_f32(const float* src, int64_t source_stride, int64_t row_stride, const float* coef, int S, int64_t rows,
                    int64_t cols, float* dst);
// Serial over rows [r0, r1): call it inside a parallel region.
void lora_rows(const LoraRowsArgs& args, int64_t r0, int64_t r1);
// Serial over rows [r0, r1): call them inside a parallel region.
void depthwise_mix_rows(const DepthwiseArgs& args, int64_t r0, int64_t r1);
void depthwise_rows(const DepthwiseArgs& args, int64_t r0, int64_t r1);

}  // namespace cpu
}  // namespace dawin_ext
