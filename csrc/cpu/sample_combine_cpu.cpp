// CPU per-sample combine of S partial outputs: out[b, m, n] = sum_s w[b, s] * x[b, m, s, n].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../common/blend_math.h"
#include "../ops.h"

namespace dawin_ext {

at::Tensor sample_combine_cpu(const at::Tensor& stacked, const at::Tensor& weights) {
  check_sample_combine_args(stacked, weights);
  const int64_t B = stacked.size(0), M = stacked.size(1), S = stacked.size(2), N = stacked.size(3);
  const at::Tensor x = stacked.contiguous();
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, M, N}, stacked.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_combine_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const float* wp = w.const_data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(N * S, 1));
    at::parallel_for(0, B * M, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / M;
        const scalar_t* xr = xp + r * S * N;
        scalar_t* orow = op + r * N;
        const float* wb = wp + b * S;
        for (int64_t n = 0; n < N; ++n) {
          float acc = 0.f;
          for (int64_t s = 0; s < S; ++s) acc += wb[s] * static_cast<float>(xr[s * N + n]);
          orow[n] = static_cast<scalar_t>(acc);
        }
      }
    });
  });
  return out;
}

}  // namespace dawin_ext
