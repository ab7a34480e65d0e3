// AVX2 copy of the CPU kernels (see cpu_kernels.h for why the ISA is switched by pragma).
#include "cpu_kernels_prelude.h"

#if DAWIN_EXT_X86_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
// `#pragma GCC target` switches code generation but not the feature macros that sleef.h (the
// vectorized exp) and the vec headers test, so they are set here for the rest of this file.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#ifndef __POPCNT__
#define __POPCNT__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define DAWIN_EXT_ISA_NS isa_avx2
#include "cpu_kernels_impl.h"
#pragma GCC pop_options
#else
// Never selected by level(); defined so that the dispatch links everywhere.
namespace dawin_ext::cpu::isa_avx2 {
void entropy_rows(const EntropyRowsArgs&) { TORCH_CHECK(false, "dawin_ext: AVX2 kernels not built"); }
void sample_combine(const SampleCombineArgs&) { TORCH_CHECK(false, "dawin_ext: AVX2 kernels not built"); }
}  // namespace dawin_ext::cpu::isa_avx2
#endif
