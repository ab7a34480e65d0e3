// Baseline-ISA copy of the CPU kernels (Vectorized's portable fallback), and the run-time dispatch.
#include <ATen/Version.h>

#include <cstdlib>
#include <string>

#include "cpu_kernels_prelude.h"

#define DAWIN_EXT_ISA_NS isa_default
#include "cpu_kernels_impl.h"

namespace dawin_ext {
namespace cpu {

namespace {
Level detect_level() {
#if DAWIN_EXT_X86_ISA_COPIES
  // torch's own pick (AVX512 / AVX2 / DEFAULT; ATEN_CPU_CAPABILITY can lower it), intersected with
  // what this CPU reports for the exact feature sets the copies are compiled with.
  const std::string torch_cap = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (torch_cap == "AVX512" && avx512) return Level::kAvx512;
  if ((torch_cap == "AVX512" || torch_cap == "AVX2") && avx2) return Level::kAvx2;
#endif
  return Level::kDefault;
}
}  // namespace

Level level() {
  static const Level l = detect_level();
  return l;
}

const char* level_name(Level l) {
  switch (l) {
    case Level::kAvx512:
      return "AVX512";
    case Level::kAvx2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

void entropy_rows(const EntropyRowsArgs& args) {
  switch (level()) {
    case Level::kAvx512:
      return isa_avx512::entropy_rows(args);
    case Level::kAvx2:
      return isa_avx2::entropy_rows(args);
    default:
      return isa_default::entropy_rows(args);
  }
}

void sample_combine(const SampleCombineArgs& args) {
  switch (level()) {
    case Level::kAvx512:
      return isa_avx512::sample_combine(args);
    case Level::kAvx2:
      return isa_avx2::sample_combine(args);
    default:
      return isa_default::sample_combine(args);
  }
}

void blend_items(const BlendPlan& plan, int64_t i0, int64_t i1) {
  switch (level()) {
    case Level::kAvx512:
      return isa_avx512::blend_items(plan, i0, i1);
    case Level::kAvx2:
      return isa_avx2::blend_items(plan, i0, i1);
    default:
      return isa_default::blend_items(plan, i0, i1);
  }
}

void blend_rows_f32(const float* src, int64_t source_stride, int64_t row_stride, const float* coef, int S, int64_t rows,
                    int64_t cols, float* dst) {
  switch (level()) {
    case Level::kAvx512:
      return isa_avx512::blend_rows_f32(src, source_stride, row_stride, coef, S, rows, cols, dst);
    case Level::kAvx2:
      return isa_avx2::blend_rows_f32(src, source_stride, row_stride, coef, S, rows, cols, dst);
    default:
      return isa_default::blend_rows_f32(src, source_stride, row_stride, coef, S, rows, cols, dst);
  }
}

void lora_rows(const LoraRowsArgs& args, int64_t r0, int64_t r1) {
  switch (level()) {
    case Level::kAvx512:
      return isa_avx512::lora_rows(args, r0, r1);
    case Level::kAvx2:
      return isa_avx2::lora_rows(args, r0, r1);
    default:
      return isa_default::lora_rows(args, r0, r1);
  }
}

void depthwise_mix_rows(const DepthwiseArgs& args, int64_t r0, int64_t r1) {
  switch (level()) {
    case Level::kAvx512:
      return isa_avx512::depthwise_mix_rows(args, r0, r1);
    case Level::kAvx2:
      return isa_avx2::depthwise_mix_rows(args, r0, r1);
    default:
      return isa_default::depthwise_mix_rows(args, r0, r1);
  }
}

void depthwise_rows(const DepthwiseArgs& args, int64_t r0, int64_t r1) {
  switch (level()) {
    case Level::kAvx512:
      return isa_avx512::depthwise_rows(args, r0, r1);
    case Level::kAvx2:
      return isa_avx2::depthwise_rows(args, r0, r1);
    default:
      return isa_default::depthwise_rows(args, r0, r1);
  }
}

}  // namespace cpu
}  // namespace dawin_ext
