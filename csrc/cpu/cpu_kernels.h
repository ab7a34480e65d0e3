// Raw-pointer CPU kernels for softmax_entropy, entropy_coefficients and sample_combine, compiled once
// per CPU capability and picked at run time.
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

enum class Level { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The instruction set the kernels run with in this process.
Level level();
const char* level_name(Level l);

#define DAWIN_EXT_DECLARE_CPU_KERNELS(ns)             \
  namespace ns {                                      \
  void entropy_rows(const EntropyRowsArgs& args);     \
  void sample_combine(const SampleCombineArgs& args); \
  }

DAWIN_EXT_DECLARE_CPU_KERNELS(isa_default)
DAWIN_EXT_DECLARE_CPU_KERNELS(isa_avx2)
DAWIN_EXT_DECLARE_CPU_KERNELS(isa_avx512)
#undef DAWIN_EXT_DECLARE_CPU_KERNELS

// Dispatch to level()'s implementation.
void entropy_rows(const EntropyRowsArgs& args);
void sample_combine(const SampleCombineArgs& args);

}  // namespace cpu
}  // namespace dawin_ext
