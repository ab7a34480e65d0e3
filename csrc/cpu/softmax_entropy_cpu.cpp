// CPU softmax_entropy and entropy_coefficients: argument checks, output allocation and the strided
// [rows, C] view; the vectorized, parallel row kernel is in cpu_kernels_impl.h.
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "../ops.h"
#include "cpu_kernels.h"

namespace dawin_ext {
namespace {

// Entropy of each row of a [R, C] view; row r uses inv_temps[r / rows_per_group].
void entropy_rows(const at::Tensor& x2d, const std::vector<float>& inv_temps, int64_t rows_per_group, float* out) {
  cpu::EntropyRowsArgs args{};
  args.dtype = x2d.scalar_type();
  args.data = x2d.const_data_ptr();
  args.rows = x2d.size(0);
  args.cols = x2d.size(1);
  args.row_stride = x2d.stride(0);
  args.col_stride = x2d.stride(1);
  args.inv_temps = inv_temps.data();
  args.rows_per_group = rows_per_group;
  args.out = out;
  cpu::entropy_rows(args);
}

}  // namespace

at::Tensor softmax_entropy_cpu(const at::Tensor& logits, double temperature) {
  check_softmax_entropy_args(logits, temperature);
  const int64_t C = logits.size(-1);
  auto out_sizes = logits.sizes().vec();
  out_sizes.pop_back();
  at::Tensor out = at::empty(out_sizes, logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  // reshape keeps a strided view where it can (no copy for most non-contiguous inputs); the kernel
  // reads any row and column stride.
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
