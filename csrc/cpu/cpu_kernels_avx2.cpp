// AVX2 copy of the CPU kernels (see cpu_kernels.h for why the ISA is switched by pragma).
#include "cpu_kernels_prelude.h"

#if DAWIN_EXT_X86_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu_kernels_isa_macros.h"
#define DAWIN_EXT_ISA_NS isa_avx2
#include "cpu_kernels_impl.h"
#pragma GCC pop_options
#else
// Never selected by level(); defined so that the dispatch links everywhere.
namespace dawin_ext::cpu::isa_avx2 {
void entropy_rows(const EntropyRowsArgs&) { TORCH_CHECK(false, "dawin_ext: AVX2 kernels not built"); }
void sample_combine(const SampleCombineArgs&) { TORCH_CHECK(false, "dawin_ext: AVX2 kernels not built"); }
void blend_items(const BlendPlan&, int64_t, int64_t) { TORCH_CHECK(false, "dawin_ext: AVX2 kernels not built"); }
void blend_rows_f32(const float*, int64_t, int64_t, const float*, int, int64_t, int64_t, float*) {
  TORCH_CHECK(false, "dawin_ext: AVX2 kernels not built");
}
void lora_rows(const LoraRowsArgs&, int64_t, int64_t) { TORCH_CHECK(false, "dawin_ext: AVX2 kernels not built"); }
void depthwise_mix_rows(const DepthwiseArgs&, int64_t, int64_t) {
  TORCH_CHECK(false, "dawin_ext: AVX2 kernels not built");
}
void depthwise_rows(const DepthwiseArgs&, int64_t, int64_t) { TORCH_CHECK(false, "dawin_ext: AVX2 kernels not built"); }
}  // namespace dawin_ext::cpu::isa_avx2
#endif
