// CPU softmax-entropy: one pass over each row, blocked so that each block's max is found first and
// its elements then cost one exp each; blocks merge with the shared rescaling rule.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/entropy_math.h"
#include "../ops.h"

namespace dawin_ext {
namespace {

constexpr int64_t kBlock = 1024;

template <typename scalar_t>
float row_entropy(const scalar_t* row, int64_t C, int64_t stride, float inv_t) {
  math::EntropyState st = math::entropy_state_empty();
  float buf[kBlock];
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = std::min(kBlock, C - c0);
    float bm = -std::numeric_limits<float>::infinity();
    bool has_nan = false;
    for (int64_t i = 0; i < n; ++i) {
      const float z = static_cast<float>(row[(c0 + i) * stride]) * inv_t;
      buf[i] = z;
      has_nan |= (z != z);
      bm = std::max(bm, z);
    }
    math::EntropyState blk{bm, 0.f, 0.f};
    if (has_nan) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      blk = math::EntropyState{nan, nan, nan};
    } else if (bm != -std::numeric_limits<float>::infinity()) {
      for (int64_t i = 0; i < n; ++i) math::entropy_state_accumulate(blk, buf[i]);
    } else {
      blk = math::entropy_state_empty();
    }
    st = math::entropy_state_merge(st, blk);
  }
  return math::entropy_state_finalize(st);
}

// Entropy of each row of a [R, C] view; row r uses inv_temps[r / rows_per_group].
void entropy_rows(const at::Tensor& x2d, const std::vector<float>& inv_temps, int64_t rows_per_group, float* out) {
  const int64_t R = x2d.size(0);
  const int64_t C = x2d.size(1);
  const int64_t rs = x2d.stride(0);
  const int64_t cs = x2d.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2d.scalar_type(), "softmax_entropy_cpu", [&] {
    const scalar_t* base = x2d.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        out[r] = row_entropy<scalar_t>(base + r * rs, C, cs, inv_temps[r / rows_per_group]);
      }
    });
  });
}

}  // namespace

at::Tensor softmax_entropy_cpu(const at::Tensor& logits, double temperature) {
  check_softmax_entropy_args(logits, temperature);
  const int64_t C = logits.size(-1);
  auto out_sizes = logits.sizes().vec();
  out_sizes.pop_back();
  at::Tensor out = at::empty(out_sizes, logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  // reshape keeps a strided view where it can (no copy for most non-contiguous inputs).
  const at::Tensor x2d = logits.reshape({-1, C});
  entropy_rows(x2d, {static_cast<float>(1.0 / temperature)}, x2d.size(0), out.data_ptr<float>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> entropy_coefficients_cpu(const at::Tensor& logits,
                                                            c10::ArrayRef<double> temperatures,
                                                            bool offset_adjustment) {
  check_entropy_coefficients_args(logits, temperatures, offset_adjustment);
  const int64_t M = logits.size(0);
  const int64_t B = logits.size(1);
  const int64_t C = logits.size(2);
  std::vector<float> inv_temps(M, 1.f);
  for (int64_t m = 0; m < static_cast<int64_t>(temperatures.size()); ++m) {
    inv_temps[m] = static_cast<float>(1.0 / temperatures[m]);
  }
  at::Tensor entropies = at::empty({M, B}, logits.options().dtype(at::kFloat));
  if (B > 0) {
    const at::Tensor x2d = logits.reshape({M * B, C});
    entropy_rows(x2d, inv_temps, B, entropies.data_ptr<float>());
  }
  return {coefficients_from_entropies(entropies, offset_adjustment), entropies};
}

}  // namespace dawin_ext
