// CPU multi-tensor blend: every (tensor, chunk) pair of the whole state dict is one work item of a
// single parallel loop; each item reads its S source chunks once and writes its K output chunks once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/blend_math.h"
#include "../ops.h"

namespace dawin_ext {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename scalar_t>
void blend_chunk(const std::vector<const scalar_t*>& src, const std::vector<scalar_t*>& dst, const float* coef,
                 int64_t S, int64_t K, int64_t begin, int64_t end) {
  float x[math::kMaxSources];
  float y[math::kMaxClusters];
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t s = 0; s < S; ++s) x[s] = static_cast<float>(src[s][i]);
    math::blend_point_dynamic(x, coef, static_cast<int>(S), static_cast<int>(K), y);
    for (int64_t k = 0; k < K; ++k) dst[k][i] = static_cast<scalar_t>(y[k]);
  }
}

}  // namespace

void blend_cpu(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out) {
  check_blend_args(sources, coefficients, out);
  const int64_t K = coefficients.size(0);
  const int64_t S = coefficients.size(1);
  const int64_t N = static_cast<int64_t>(sources.size()) / S;
  const at::Tensor coef = coefficients.to(at::kCPU, at::kFloat).contiguous();
  const float* c = coef.const_data_ptr<float>();

  // Sources may be strided; a contiguous copy is made only for those that are not.
  std::vector<at::Tensor> src_c(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) src_c[i] = sources[i].contiguous();

  std::vector<WorkItem> items;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t numel = src_c[n].numel();
    for (int64_t b = 0; b < numel; b += kChunk) items.push_back({n, b, std::min(numel, b + kChunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const WorkItem& w = items[i];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src_c[w.tensor].scalar_type(), "blend_cpu", [&] {
        std::vector<const scalar_t*> sp(S);
        std::vector<scalar_t*> dp(K);
        for (int64_t s = 0; s < S; ++s) sp[s] = src_c[s * N + w.tensor].const_data_ptr<scalar_t>();
        for (int64_t k = 0; k < K; ++k) dp[k] = out[k * N + w.tensor].data_ptr<scalar_t>();
        blend_chunk<scalar_t>(sp, dp, c, S, K, w.begin, w.end);
      });
    }
  });
}

}  // namespace dawin_ext
