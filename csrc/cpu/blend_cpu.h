// The CPU blend kernel's row blend, for callers that blend small blocks themselves.
#pragma once

#include <cstdint>

namespace dawin_ext {
namespace cpu {

// dst[r * cols + j] = sum_s coef[s] * src[s * source_stride + r * row_stride + j] for r < rows, j < cols (fp32),
// with blend's SIMD copy for this CPU and its accumulation order. Serial: call it inside a parallel region.
// samplewise_linear forms one sample's merged weight block with it.
void blend_rows_f32(const float* src, int64_t source_stride, int64_t row_stride, const float* coef, int sources,
                    int64_t rows, int64_t cols, float* dst);

}  // namespace cpu
}  // namespace dawin_ext
