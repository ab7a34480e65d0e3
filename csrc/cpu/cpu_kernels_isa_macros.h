// Feature macros of the AVX copies, defined once (see cpu_kernels.h). Included by cpu_kernels_avx2.cpp and
// cpu_kernels_avx512.cpp right after their `#pragma GCC target(...)` and CPU_CAPABILITY_* defines:
// `#pragma GCC target` switches code generation but not the feature macros that sleef.h (the
// vectorized exp) and the vec headers test, so they are set here for the rest of that file. Both copies
// get the AVX2 set; CPU_CAPABILITY_AVX512 adds the AVX512 one. No include guard on purpose.
#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#error "define CPU_CAPABILITY_AVX2 or CPU_CAPABILITY_AVX512 before including cpu_kernels_isa_macros.h"
#endif

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

#ifdef CPU_CAPABILITY_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
