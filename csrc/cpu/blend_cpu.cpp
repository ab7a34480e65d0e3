// CPU multi-tensor blend: every (tensor, chunk) pair of the whole state dict is one work item of a
// single parallel loop; each item reads its S source chunks once and writes its K output chunks once.
// This file builds the plan (pointers, dtypes, items, coefficients); the per-item kernel is
// cpu::blend_items, written once on at::vec in cpu_kernels_impl.h and compiled per instruction set
// with the other CPU kernels (cpu_kernels.h). fp32/fp16/bf16 accumulate in fp32, float64 in double.
// Outputs much larger than the caches are written with non-temporal stores (no read-for-ownership).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops.h"
#include "cpu_kernels.h"

namespace dawin_ext {
namespace {

// Elements per work item: large enough to amortize the per-item setup, small enough to balance two
// threads on a ~300-tensor state dict. A multiple of 64 keeps chunk starts vector-aligned.
constexpr int64_t kChunk = 32768;
// Above this many output bytes per call the outputs cannot stay in cache, so streaming stores win.
constexpr int64_t kStreamBytes = int64_t{32} << 20;
// Below this many element reads plus writes a blend runs on the calling thread (see blend_cpu).
constexpr int64_t kSerialBelowElements = int64_t{1} << 18;

}  // namespace

void blend_cpu(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out) {
  check_blend_args(sources, coefficients, out);
  // In-place outputs (exactly a source of their own index) are safe here: every code path (vector,
  // scalar head/tail, streaming stores) loads an element of all S sources before it stores that element
  // of any output, and each element belongs to one work item. Other sharing is refused.
  check_blend_aliasing(sources, coefficients, out);
  const int64_t K = coefficients.size(0);
  const int64_t S = coefficients.size(1);
  const int64_t N = static_cast<int64_t>(sources.size()) / S;

  cpu::BlendPlan plan;
  plan.num_sources = static_cast<int>(S);
  plan.num_clusters = static_cast<int>(K);
  plan.num_tensors = N;
  const at::Tensor coef_d = coefficients.detach().to(at::kCPU, at::kDouble).contiguous();
  plan.coef_d.assign(coef_d.const_data_ptr<double>(), coef_d.const_data_ptr<double>() + K * S);
  plan.coef_f.assign(plan.coef_d.begin(), plan.coef_d.end());  // rounded once, like torch's fp32 scalar ops

  // Sources may be strided; a contiguous copy is made only for those that are not.
  std::vector<at::Tensor> src_c(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) src_c[i] = sources[i].contiguous();

  plan.src.resize(N * S);
  plan.dst.resize(N * K);
  plan.dtypes.resize(N);
  int64_t out_bytes = 0;
  for (int64_t n = 0; n < N; ++n) {
    plan.dtypes[n] = src_c[n].scalar_type();
    for (int64_t s = 0; s < S; ++s) plan.src[n * S + s] = src_c[s * N + n].const_data_ptr();
    for (int64_t k = 0; k < K; ++k) plan.dst[n * K + k] = out[k * N + n].data_ptr();
    const int64_t numel = src_c[n].numel();
    out_bytes += K * numel * static_cast<int64_t>(src_c[n].element_size());
    for (int64_t b = 0; b < numel; b += kChunk) plan.items.push_back({n, b, std::min(numel, b + kChunk)});
  }
  plan.stream = out_bytes >= kStreamBytes;
  if (plan.items.empty()) return;

  // A small state dict (a few thousand elements) costs less than waking the thread pool, and on a busy
  // machine a parallel region can wait milliseconds for a core: run it on the calling thread.
  int64_t touched = 0;
  for (const auto& item : plan.items) touched += (item.end - item.begin) * (S + K);
  const int64_t num_items = static_cast<int64_t>(plan.items.size());
  const int64_t grain = touched < kSerialBelowElements ? num_items : 1;
  at::parallel_for(0, num_items, grain, [&](int64_t i0, int64_t i1) { cpu::blend_items(plan, i0, i1); });
}

}  // namespace dawin_ext
