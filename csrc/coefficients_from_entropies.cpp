// entropy_coefficients' last step, shared by its CPU and CUDA kernels: the per-sample model coefficients
// from the entropies, as a composite of ATen ops (so it runs on the entropies' device).
#include <ATen/ATen.h>

#include "ops.h"

namespace dawin_ext {

at::Tensor coefficients_from_entropies(const at::Tensor& entropies, bool offset_adjustment) {
  // entropies: [M, B] fp32. Result [B, M].
  if (!offset_adjustment) {
    // exp(-H_m) / sum_j exp(-H_j) == softmax over models of -H (stable for any H).
    return at::softmax(entropies.neg(), 0).t().contiguous();
  }
  // DaWin's per-domain offset (reference main_dawin.py): statistics over the whole batch, torch's
  // unbiased std. lambda = (e^-H_ft + b / w) / (e^-H_zs + e^-H_ft + b).
  const at::Tensor h_zs = entropies[0];
  const at::Tensor h_ft = entropies[1];
  const at::Tensor mean_zs = h_zs.mean();
  const at::Tensor mean_ft = h_ft.mean();
  const at::Tensor b = (h_zs.std() / mean_zs + h_ft.std() / mean_ft) / 2;
  const at::Tensor w = (mean_zs + mean_ft) / mean_zs;
  const at::Tensor e_zs = h_zs.neg().exp();
  const at::Tensor e_ft = h_ft.neg().exp();
  const at::Tensor lam = (e_ft + b / w) / (e_zs + e_ft + b);
  return at::stack({1 - lam, lam}, 1).contiguous();
}

}  // namespace dawin_ext
