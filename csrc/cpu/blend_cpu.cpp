// CPU multi-tensor blend: every (tensor, chunk) pair of the whole state dict is one work item of a
// single parallel loop; each item reads its S source chunks once and writes its K output chunks once.
//
// Vectorization: ATen's Vectorized<T> only becomes AVX2/AVX512 code in translation units compiled
// with CPU_CAPABILITY flags, which an extension build does not get. So the SIMD body
// (blend_cpu_simd.h) is written with GCC vector extensions plus a few F16C/AVX512 intrinsics and
// compiled twice in this file, under `#pragma GCC target("avx2,...")` and `("avx512...")`, each copy in
// its own namespace. At run time the copy for cpu::level() is used (the widest set that both torch's own
// choice, which honours ATEN_CPU_CAPABILITY=default|avx2|avx512, and the CPU allow; see cpu_kernels.h);
// otherwise a scalar loop. Each copy has an aligned vector loop and a scalar head/tail; fp32/fp16/bf16
// accumulate in fp32, float64 in double.
// Outputs much larger than the caches are written with non-temporal stores (no read-for-ownership).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define DAWIN_BLEND_X86_SIMD 1
#else
#define DAWIN_BLEND_X86_SIMD 0
#endif

#include "../common/blend_math.h"
#include "../ops.h"
#include "blend_cpu.h"
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

struct BlendItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct BlendPlan {
  int num_sources = 0;
  int num_clusters = 0;
  int64_t num_tensors = 0;
  bool stream = false;
  std::vector<const void*> src;  // [n * S + s]
  std::vector<void*> dst;        // [n * K + k]
  std::vector<at::ScalarType> dtypes;
  std::vector<BlendItem> items;
  std::vector<float> coef_f;   // [K * S]
  std::vector<double> coef_d;  // [K * S]

  const void* src_ptr(int64_t n, int s) const { return src[n * num_sources + s]; }
  void* dst_ptr(int64_t n, int k) const { return dst[n * num_clusters + k]; }
  template <typename acc_t>
  const acc_t* coef() const {
    if constexpr (sizeof(acc_t) == sizeof(double)) {
      return coef_d.data();
    } else {
      return coef_f.data();
    }
  }
};

// Scalar loop, used for heads/tails of the vector loops and as the whole kernel without SIMD.
template <typename scalar_t>
void blend_scalar_range(const scalar_t* const* src, scalar_t* const* dst,
                        const typename math::BlendAcc<scalar_t>::type* coef, int S, int K, int64_t begin, int64_t end) {
  using acc_t = typename math::BlendAcc<scalar_t>::type;
  acc_t x[math::kMaxSources];
  for (int64_t i = begin; i < end; ++i) {
    for (int s = 0; s < S; ++s) x[s] = static_cast<acc_t>(src[s][i]);
    for (int k = 0; k < K; ++k) dst[k][i] = static_cast<scalar_t>(math::blend_dot<0, acc_t>(x, coef + k * S, S));
  }
}
// Instantiated here, before any target pragma, so that these symbols are baseline-ISA code.
template void blend_scalar_range<float>(const float* const*, float* const*, const float*, int, int, int64_t, int64_t);
template void blend_scalar_range<double>(const double* const*, double* const*, const double*, int, int, int64_t,
                                         int64_t);
template void blend_scalar_range<c10::Half>(const c10::Half* const*, c10::Half* const*, const float*, int, int, int64_t,
                                            int64_t);
template void blend_scalar_range<c10::BFloat16>(const c10::BFloat16* const*, c10::BFloat16* const*, const float*, int,
                                                int, int64_t, int64_t);

template <typename scalar_t>
void scalar_items(const BlendPlan& plan, int64_t i0, int64_t i1) {
  using acc_t = typename math::BlendAcc<scalar_t>::type;
  const scalar_t* src[math::kMaxSources];
  scalar_t* dst[math::kMaxClusters];
  for (int64_t it = i0; it < i1; ++it) {
    const BlendItem& w = plan.items[it];
    for (int s = 0; s < plan.num_sources; ++s) src[s] = static_cast<const scalar_t*>(plan.src_ptr(w.tensor, s));
    for (int k = 0; k < plan.num_clusters; ++k) dst[k] = static_cast<scalar_t*>(plan.dst_ptr(w.tensor, k));
    blend_scalar_range<scalar_t>(src, dst, plan.coef<acc_t>(), plan.num_sources, plan.num_clusters, w.begin, w.end);
  }
}

void run_items_scalar(const BlendPlan& plan, int64_t i0, int64_t i1) {
  for (int64_t it = i0; it < i1; ++it) {
    switch (plan.dtypes[plan.items[it].tensor]) {
      case at::kFloat:
        scalar_items<float>(plan, it, it + 1);
        break;
      case at::kDouble:
        scalar_items<double>(plan, it, it + 1);
        break;
      case at::kHalf:
        scalar_items<c10::Half>(plan, it, it + 1);
        break;
      case at::kBFloat16:
        scalar_items<c10::BFloat16>(plan, it, it + 1);
        break;
      default:
        TORCH_CHECK(false, "blend: unsupported dtype ", plan.dtypes[plan.items[it].tensor]);
    }
  }
}

}  // namespace

#if DAWIN_BLEND_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace {
namespace blend_avx2 {
#define DAWIN_VB 32
#include "blend_cpu_simd.h"
#undef DAWIN_VB
}  // namespace blend_avx2
}  // namespace
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace {
namespace blend_avx512 {
#define DAWIN_VB 64
#include "blend_cpu_simd.h"
#undef DAWIN_VB
}  // namespace blend_avx512
}  // namespace
#pragma GCC pop_options
#endif

namespace cpu {

void blend_rows_f32(const float* src, int64_t source_stride, int64_t row_stride, const float* coef, int sources,
                    int64_t rows, int64_t cols, float* dst) {
  switch (cpu::level()) {
#if DAWIN_BLEND_X86_SIMD
    case cpu::Level::kAvx512:
      return blend_avx512::blend_rows(src, source_stride, row_stride, coef, sources, rows, cols, dst);
    case cpu::Level::kAvx2:
      return blend_avx2::blend_rows(src, source_stride, row_stride, coef, sources, rows, cols, dst);
#endif
    default:
      break;
  }
  const float* srcs[math::kMaxSources];
  for (int64_t r = 0; r < rows; ++r) {
    for (int s = 0; s < sources; ++s) srcs[s] = src + s * source_stride + r * row_stride;
    float* out = dst + r * cols;
    blend_scalar_range<float>(srcs, &out, coef, sources, 1, 0, cols);
  }
}

}  // namespace cpu

void blend_cpu(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out) {
  check_blend_args(sources, coefficients, out);
  // In-place outputs (exactly a source of their own index) are safe here: every code path (vector,
  // scalar head/tail, streaming stores) loads an element of all S sources before it stores that element
  // of any output, and each element belongs to one work item. Other sharing is refused.
  check_blend_aliasing(sources, coefficients, out);
  const int64_t K = coefficients.size(0);
  const int64_t S = coefficients.size(1);
  const int64_t N = static_cast<int64_t>(sources.size()) / S;

  BlendPlan plan;
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
  const cpu::Level isa = cpu::level();
  at::parallel_for(0, num_items, grain, [&](int64_t i0, int64_t i1) {
    switch (isa) {
#if DAWIN_BLEND_X86_SIMD
      case cpu::Level::kAvx512:
        blend_avx512::run_items(plan, i0, i1);
        break;
      case cpu::Level::kAvx2:
        blend_avx2::run_items(plan, i0, i1);
        break;
#endif
      default:
        run_items_scalar(plan, i0, i1);
    }
  });
}

}  // namespace dawin_ext
