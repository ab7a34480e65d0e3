// The vectorized CPU kernels, written once and compiled once per capability (see cpu_kernels.h).
// The includer defines DAWIN_EXT_ISA_NS (the namespace) and, for AVX builds, CPU_CAPABILITY,
// CPU_CAPABILITY_AVX2/AVX512 and the matching `#pragma GCC target` before including this file.
// No include guard on purpose. The per-element and per-block arithmetic follows
// common/entropy_math.h (the CUDA kernels use the same header).
#ifndef DAWIN_EXT_ISA_NS
#error "define DAWIN_EXT_ISA_NS before including cpu_kernels_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace dawin_ext {
namespace cpu {
namespace DAWIN_EXT_ISA_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 2048;         // elements per block: read twice (max, then exp) while in L1
constexpr int64_t kSplit = 16 * kBlock;  // longer rows are split into work items merged afterwards

float lane_max(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float m = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) m = math::nan_max(m, lanes[i]);
  return m;
}

float lane_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// Adds the block z = x[0, n) * scale to st (math::entropy_state_push_block, vectorized).
// max(x) * scale == max(x * scale) exactly for scale > 0, since rounding is monotone.
void push_block(math::EntropyState& st, const float* x, int64_t n, float scale) {
  constexpr int64_t V = Vec::size();
  const int64_t nv = n - n % V;
  Vec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < nv; i += V) vmax = at::vec::maximum(vmax, Vec::loadu(x + i));
  float bm = nv > 0 ? lane_max(vmax) : -std::numeric_limits<float>::infinity();
  for (int64_t i = nv; i < n; ++i) bm = math::nan_max(bm, x[i]);
  if (!math::entropy_state_begin_block(st, bm * scale)) return;
  const Vec m(st.m);
  const Vec vscale(scale);
  // weighted_term's guard, vector form: d = -inf (a -inf logit) is clamped to the lowest finite
  // float, whose exp is 0, so it adds 0 to t instead of 0 * -inf = NaN. Finite d are unchanged.
  const Vec lowest(std::numeric_limits<float>::lowest());
  Vec s0(0.f), t0(0.f), s1(0.f), t1(0.f);
  int64_t i = 0;
  for (; i + 2 * V <= nv; i += 2 * V) {
    const Vec d0 = at::vec::clamp_min(Vec::loadu(x + i) * vscale - m, lowest);
    const Vec d1 = at::vec::clamp_min(Vec::loadu(x + i + V) * vscale - m, lowest);
    const Vec e0 = d0.exp();
    const Vec e1 = d1.exp();
    s0 = s0 + e0;
    s1 = s1 + e1;
    t0 = at::vec::fmadd(e0, d0, t0);
    t1 = at::vec::fmadd(e1, d1, t1);
  }
  for (; i < nv; i += V) {
    const Vec d0 = at::vec::clamp_min(Vec::loadu(x + i) * vscale - m, lowest);
    const Vec e0 = d0.exp();
    s0 = s0 + e0;
    t0 = at::vec::fmadd(e0, d0, t0);
  }
  st.s += lane_sum(s0 + s1);
  st.t += lane_sum(t0 + t1);
  for (int64_t j = nv; j < n; ++j) math::entropy_state_accumulate(st, x[j] * scale);
}

// Converts n elements (stride cs) to float in buf.
template <typename scalar_t>
void load_block(const scalar_t* src, int64_t n, int64_t cs, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t i = 0; i < n; ++i) buf[i] = src[i * cs];
  } else {
    int64_t i = 0;
    if (cs == 1) {
      using RVec = at::vec::Vectorized<scalar_t>;
      for (; i + RVec::size() <= n; i += RVec::size()) {
        auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(src + i));
        lo.store(buf + i);
        hi.store(buf + i + Vec::size());
      }
    }
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i * cs]);
  }
}

// State of columns [c0, c1) of one row.
template <typename scalar_t>
math::EntropyState range_state(const scalar_t* row, int64_t c0, int64_t c1, int64_t cs, float scale) {
  math::EntropyState st = math::entropy_state_empty();
  alignas(64) float buf[kBlock];
  for (int64_t b = c0; b < c1; b += kBlock) {
    const int64_t n = std::min(kBlock, c1 - b);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (cs == 1) {
        push_block(st, row + b, n, scale);  // read in place, no copy
        continue;
      }
    }
    load_block(row + b * cs, n, cs, buf);
    push_block(st, buf, n, scale);
  }
  return st;
}

template <typename scalar_t>
void entropy_rows_typed(const EntropyRowsArgs& a) {
  const auto* base = static_cast<const scalar_t*>(a.data);
  const int64_t R = a.rows, C = a.cols;
  const auto scale_of = [&](int64_t r) { return a.inv_temps[r / a.rows_per_group]; };
  if (C <= kSplit) {
    // At least ~128K elements per task: below that a second thread costs more than it saves.
    const int64_t grain = std::max<int64_t>(1, 131072 / C);
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const math::EntropyState st = range_state(base + r * a.row_stride, 0, C, a.col_stride, scale_of(r));
        a.out[r] = math::entropy_state_finalize(st);
      }
    });
    return;
  }
  // Long rows: every (row, column chunk) is a work item, so a single long row still uses every
  // thread; the chunk states are merged with the rescaling rule.
  const int64_t chunks = (C + kSplit - 1) / kSplit;
  std::vector<math::EntropyState> states(static_cast<size_t>(R * chunks));
  at::parallel_for(0, R * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / chunks, c0 = (i % chunks) * kSplit;
      states[i] = range_state(base + r * a.row_stride, c0, std::min(C, c0 + kSplit), a.col_stride, scale_of(r));
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    math::EntropyState st = states[r * chunks];
    for (int64_t k = 1; k < chunks; ++k) st = math::entropy_state_merge(st, states[r * chunks + k]);
    a.out[r] = math::entropy_state_finalize(st);
  }
}

// sample_combine: work items are (row b*M+m, column chunk of kCombineChunk); each source row
// segment is read once and the output written once, accumulated in fp32.
constexpr int64_t kCombineChunk = 1024;

template <typename scalar_t>
void sample_combine_typed(const SampleCombineArgs& a) {
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t rows = a.B * a.M, S = a.S, N = a.N;
  const int64_t chunks = (N + kCombineChunk - 1) / kCombineChunk;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S * std::min(N, kCombineChunk)));
  at::parallel_for(0, rows * chunks, grain, [&](int64_t i0, int64_t i1) {
    alignas(64) float acc[kCombineChunk];
    alignas(64) float tmp[kCombineChunk];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / chunks, n0 = (i % chunks) * kCombineChunk;
      const int64_t n = std::min(kCombineChunk, N - n0);
      const float* w = a.w + (r / a.M) * S;
      const scalar_t* xr = x + r * S * N + n0;
      std::fill(acc, acc + n, 0.f);
      for (int64_t s = 0; s < S; ++s) {
        const float* src;
        if constexpr (std::is_same_v<scalar_t, float>) {
          src = xr + s * N;
        } else {
          load_block(xr + s * N, n, 1, tmp);
          src = tmp;
        }
        const Vec ws(w[s]);
        int64_t j = 0;
        for (; j + Vec::size() <= n; j += Vec::size()) {
          at::vec::fmadd(ws, Vec::loadu(src + j), Vec::loadu(acc + j)).store(acc + j);
        }
        for (; j < n; ++j) acc[j] = std::fma(w[s], src[j], acc[j]);
      }
      scalar_t* o = out + r * N + n0;
      if constexpr (std::is_same_v<scalar_t, float>) {
        std::copy(acc, acc + n, o);
      } else {
        at::vec::convert(acc, o, n);
      }
    }
  });
}

}  // namespace

void entropy_rows(const EntropyRowsArgs& a) {
  switch (a.dtype) {
    case at::kFloat:
      return entropy_rows_typed<float>(a);
    case at::kHalf:
      return entropy_rows_typed<at::Half>(a);
    case at::kBFloat16:
      return entropy_rows_typed<at::BFloat16>(a);
    default:
      TORCH_CHECK(false, "dawin_ext cpu kernels: unsupported dtype ", a.dtype);
  }
}

void sample_combine(const SampleCombineArgs& a) {
  switch (a.dtype) {
    case at::kFloat:
      return sample_combine_typed<float>(a);
    case at::kHalf:
      return sample_combine_typed<at::Half>(a);
    case at::kBFloat16:
      return sample_combine_typed<at::BFloat16>(a);
    default:
      TORCH_CHECK(false, "dawin_ext cpu kernels: unsupported dtype ", a.dtype);
  }
}

}  // namespace DAWIN_EXT_ISA_NS
}  // namespace cpu
}  // namespace dawin_ext
