// Headers that the per-capability kernel files include BEFORE switching the target ISA, so that
// every inline function they define is compiled for the baseline ISA (see cpu_kernels.h). This list
// covers what ATen/cpu/vec/vec.h pulls in besides the Vectorized specializations themselves.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/blend_math.h"
#include "../common/entropy_math.h"
#include "../common/samplewise_depthwise_kernel.h"
#include "../common/samplewise_lora_kernel.h"
#include "cpu_kernels.h"

// The x86 ISA-specific copies are built with GCC only (`#pragma GCC target` semantics); other
// compilers and architectures build the baseline copy and level() never picks the others.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define DAWIN_EXT_X86_ISA_COPIES 1
#else
#define DAWIN_EXT_X86_ISA_COPIES 0
#endif
