// The vectorized CPU kernels (entropy rows, sample_combine, blend), written once on ATen's
// at::vec::Vectorized and compiled once per capability (see cpu_kernels.h).
// The includer defines DAWIN_EXT_ISA_NS (the namespace) and, for AVX builds, CPU_CAPABILITY,
// CPU_CAPABILITY_AVX2/AVX512 and the matching `#pragma GCC target` before including this file.
// No include guard on purpose. The per-element and per-block arithmetic follows
// common/entropy_math.h and common/blend_math.h (the CUDA kernels use the same headers).
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

// ---- blend ----
// Elements [begin, end) of one tensor: dst[k][i] = sum_s coef[k * S + s] * src[s][i], accumulated in
// math::BlendAcc (fp32 for fp32/fp16/bf16, fp64 for fp64), in the order of math::blend_dot.

// Non-temporal store of one vector (outputs far larger than the caches: no read-for-ownership). Only the
// AVX copies have them; the baseline copy never streams (blend_range checks kCanStream).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kCanStream = true;
template <typename scalar_t>
void stream_store(scalar_t* p, const at::vec::Vectorized<scalar_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    _mm512_stream_pd(p, v);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  }
#else
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    _mm256_stream_pd(p, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  }
#endif
}
#else
constexpr bool kCanStream = false;
template <typename scalar_t>
void stream_store(scalar_t* p, const at::vec::Vectorized<scalar_t>& v) {
  v.store(p);
}
#endif

// One step of blend's vector loop: Vectorized<scalar_t>::size() elements, held as kParts vectors of the
// accumulation type (fp16/bf16 widen to two fp32 vectors; fp32 and fp64 are one vector).
template <typename scalar_t>
struct BlendIo {
  using acc_t = typename math::BlendAcc<scalar_t>::type;
  using AVec = at::vec::Vectorized<acc_t>;
  using RVec = at::vec::Vectorized<scalar_t>;
  static constexpr int kParts = RVec::size() / AVec::size();
  static constexpr int64_t kStep = RVec::size();
  static void load(const scalar_t* p, AVec* v) {
    if constexpr (kParts == 1) {
      v[0] = AVec::loadu(p);
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(p));
      v[0] = lo;
      v[1] = hi;
    }
  }
  // Narrowing rounds to nearest even, like c10::Half / c10::BFloat16's conversions.
  static void store(scalar_t* p, const AVec* v, bool nt) {
    RVec r;
    if constexpr (kParts == 1) {
      r = v[0];
    } else {
      r = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
    }
    if (nt) {
      stream_store(p, r);
    } else {
      r.store(p);
    }
  }
};

// Scalar loop: heads and tails of the vector loop.
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

// S_/K_ > 0 fix the counts at compile time (the common S = 2 case); 0 means use S/K. `stream` asks for
// non-temporal stores: they are used from the first index where every dst[k] is vector-aligned, if that
// index is the same for all k.
template <typename scalar_t, int S_, int K_>
void blend_range(const scalar_t* const* src, scalar_t* const* dst, const typename BlendIo<scalar_t>::AVec* coef_v,
                 const typename math::BlendAcc<scalar_t>::type* coef, int num_sources, int num_clusters, int64_t begin,
                 int64_t end, bool stream) {
  using Io = BlendIo<scalar_t>;
  using AVec = typename Io::AVec;
  constexpr int P = Io::kParts;
  constexpr int64_t W = Io::kStep;
  constexpr int kS = S_ > 0 ? S_ : math::kMaxSources;
  constexpr int kK = K_ > 0 ? K_ : math::kMaxClusters;
  const int S = S_ > 0 ? S_ : num_sources;
  const int K = K_ > 0 ? K_ : num_clusters;
  int64_t i = begin;
  bool nt = false;
  if (kCanStream && stream) {
    // Elements to the first vector-aligned address of dst[0]; all outputs must agree.
    constexpr uintptr_t mask = sizeof(typename Io::RVec) - 1;
    const uintptr_t a0 = reinterpret_cast<uintptr_t>(dst[0] + begin);
    const int64_t head = static_cast<int64_t>(((mask + 1 - (a0 & mask)) & mask) / sizeof(scalar_t));
    nt = (a0 % sizeof(scalar_t)) == 0;
    for (int k = 1; k < K && nt; ++k) nt = ((reinterpret_cast<uintptr_t>(dst[k] + begin) ^ a0) & mask) == 0;
    if (nt) {
      const int64_t stop = std::min(begin + head, end);
      blend_scalar_range<scalar_t>(src, dst, coef, S, K, begin, stop);
      i = stop;
    }
  }
  AVec x[kS][P];
  for (; i + W <= end; i += W) {
#pragma GCC unroll 16
    for (int s = 0; s < kS; ++s) {
      if (S_ == 0 && s >= S) break;
      Io::load(src[s] + i, x[s]);
    }
#pragma GCC unroll 16
    for (int k = 0; k < kK; ++k) {
      if (K_ == 0 && k >= K) break;
      const AVec* c = coef_v + k * S;
      AVec acc[P];
      for (int p = 0; p < P; ++p) acc[p] = c[0] * x[0][p];
#pragma GCC unroll 16
      for (int s = 1; s < kS; ++s) {
        if (S_ == 0 && s >= S) break;
        for (int p = 0; p < P; ++p) acc[p] = at::vec::fmadd(c[s], x[s][p], acc[p]);
      }
      Io::store(dst[k] + i, acc, nt);
    }
  }
  blend_scalar_range<scalar_t>(src, dst, coef, S, K, i, end);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (nt) _mm_sfence();  // order the weakly-ordered streaming stores before the join
#endif
}

// One instantiation table per dtype: fixed S = 2 with K = 1..4 (WiSE-FT / DaWin clusters), S = 3
// with K = 1..3, and the runtime-count loop for everything else.
template <typename scalar_t>
void blend_items_typed(const BlendPlan& plan, int64_t i0, int64_t i1) {
  using AVec = typename BlendIo<scalar_t>::AVec;
  using acc_t = typename math::BlendAcc<scalar_t>::type;
  const int S = plan.num_sources, K = plan.num_clusters;
  const acc_t* coef = plan.coef<acc_t>();
  AVec coef_v[math::kMaxSources * math::kMaxClusters];
  for (int j = 0; j < S * K; ++j) coef_v[j] = AVec(coef[j]);
  using Fn =
      void (*)(const scalar_t* const*, scalar_t* const*, const AVec*, const acc_t*, int, int, int64_t, int64_t, bool);
  Fn fn = &blend_range<scalar_t, 0, 0>;
  if (S == 2 && K == 1) fn = &blend_range<scalar_t, 2, 1>;
  if (S == 2 && K == 2) fn = &blend_range<scalar_t, 2, 2>;
  if (S == 2 && K == 3) fn = &blend_range<scalar_t, 2, 3>;
  if (S == 2 && K == 4) fn = &blend_range<scalar_t, 2, 4>;
  if (S == 3 && K == 1) fn = &blend_range<scalar_t, 3, 1>;
  if (S == 3 && K == 2) fn = &blend_range<scalar_t, 3, 2>;
  if (S == 3 && K == 3) fn = &blend_range<scalar_t, 3, 3>;
  const scalar_t* src[math::kMaxSources];
  scalar_t* dst[math::kMaxClusters];
  for (int64_t it = i0; it < i1; ++it) {
    const BlendItem& w = plan.items[it];
    for (int s = 0; s < S; ++s) src[s] = static_cast<const scalar_t*>(plan.src_ptr(w.tensor, s));
    for (int k = 0; k < K; ++k) dst[k] = static_cast<scalar_t*>(plan.dst_ptr(w.tensor, k));
    fn(src, dst, coef_v, coef, S, K, w.begin, w.end, plan.stream);
  }
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

// Consecutive items of the same dtype go to one blend_items_typed call.
void blend_items(const BlendPlan& plan, int64_t i0, int64_t i1) {
  int64_t a = i0;
  while (a < i1) {
    const at::ScalarType t = plan.dtypes[plan.items[a].tensor];
    int64_t b = a + 1;
    while (b < i1 && plan.dtypes[plan.items[b].tensor] == t) ++b;
    switch (t) {
      case at::kFloat:
        blend_items_typed<float>(plan, a, b);
        break;
      case at::kDouble:
        blend_items_typed<double>(plan, a, b);
        break;
      case at::kHalf:
        blend_items_typed<at::Half>(plan, a, b);
        break;
      case at::kBFloat16:
        blend_items_typed<at::BFloat16>(plan, a, b);
        break;
      default:
        TORCH_CHECK(false, "dawin_ext cpu kernels: unsupported dtype ", t);
    }
    a = b;
  }
}

// samplewise_linear's weight blocks: `rows` short rows (64-256 columns) per call, in cache. blend_range is called
// directly for a fixed S (not through a function pointer, as blend_items must), so it inlines into the rows loop with
// the coefficients hoisted; a pointer call per 64-column row made samplewise_linear ~10% slower (ViT-B-32 MLP).
template <int S_>
void blend_rows_fixed(const float* src0, int64_t source_stride, int64_t row_stride, const float* coef, int S,
                      int64_t rows, int64_t cols, float* dst) {
  using AVec = BlendIo<float>::AVec;
  AVec coef_v[math::kMaxSources];
  for (int s = 0; s < S; ++s) coef_v[s] = AVec(coef[s]);
  const float* src[math::kMaxSources];
  for (int64_t r = 0; r < rows; ++r) {
    for (int s = 0; s < S; ++s) src[s] = src0 + s * source_stride + r * row_stride;
    float* out = dst + r * cols;
    blend_range<float, S_, 1>(src, &out, coef_v, coef, S, 1, 0, cols, /*stream=*/false);
  }
}

void blend_rows_f32(const float* src0, int64_t source_stride, int64_t row_stride, const float* coef, int S,
                    int64_t rows, int64_t cols, float* dst) {
  if (S == 2) return blend_rows_fixed<2>(src0, source_stride, row_stride, coef, S, rows, cols, dst);
  if (S == 3) return blend_rows_fixed<3>(src0, source_stride, row_stride, coef, S, rows, cols, dst);
  blend_rows_fixed<0>(src0, source_stride, row_stride, coef, S, rows, cols, dst);
}

namespace {
// lora_rows' row group: rows that share each load of A and Bt (kLoraRows accumulators per vector step).
constexpr int64_t kLoraRows = 4;

template <typename scalar_t>
void lora_rows_typed(const LoraRowsArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t W = Vec::size();
  const int64_t IN = a.IN, OUT = a.OUT, width = a.S * a.R;
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  scalar_t* out = static_cast<scalar_t*>(a.out);
  std::vector<float> xf(kLoraRows * IN), h(kLoraRows * width), of(kLoraRows * OUT);
  for (int64_t g0 = r0; g0 < r1; g0 += kLoraRows) {
    const int64_t n = std::min(kLoraRows, r1 - g0);
    // fp32 copies of the group's rows (x, and out for the accumulation); fp32 inputs are read in place.
    const float* xr[kLoraRows];
    float* orow[kLoraRows];
    for (int64_t r = 0; r < kLoraRows; ++r) {
      const int64_t row = g0 + std::min(r, n - 1);  // a short group repeats its last row; only n are written
      if constexpr (std::is_same_v<scalar_t, float>) {
        xr[r] = x + row * IN;
      } else {
        for (int64_t i = 0; i < IN; ++i) xf[r * IN + i] = static_cast<float>(x[row * IN + i]);
        xr[r] = xf.data() + r * IN;
      }
      for (int64_t j = 0; j < OUT; ++j) of[r * OUT + j] = static_cast<float>(out[row * OUT + j]);
      orow[r] = of.data() + r * OUT;
    }
    // Shrink: h[r, k] = A_k . x_r, each A_k chunk loaded once for the group.
    for (int64_t k = 0; k < width; ++k) {
      const float* ak = a.a + k * IN;
      Vec acc[kLoraRows];
      for (int64_t r = 0; r < kLoraRows; ++r) acc[r] = Vec(0.f);
      int64_t i = 0;
      for (; i + W <= IN; i += W) {
        const Vec av = Vec::loadu(ak + i);
        for (int64_t r = 0; r < kLoraRows; ++r) acc[r] = at::vec::fmadd(av, Vec::loadu(xr[r] + i), acc[r]);
      }
      for (int64_t r = 0; r < kLoraRows; ++r) {
        float sum = lane_sum(acc[r]);
        for (int64_t t = i; t < IN; ++t) sum += ak[t] * xr[r][t];
        h[r * width + k] = sum;
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      kernels::samplewise_lora::scale_row(h.data() + r * width, a.coef + ((g0 + r) / a.M) * a.S, a.S, a.R);
    }
    // Expand: out_r += sum_k h[r, k] Bt_k, each Bt_k chunk loaded once for the group, out chunks in registers.
    int64_t j = 0;
    for (; j + W <= OUT; j += W) {
      Vec acc[kLoraRows];
      for (int64_t r = 0; r < kLoraRows; ++r) acc[r] = Vec::loadu(orow[r] + j);
      for (int64_t k = 0; k < width; ++k) {
        const Vec bv = Vec::loadu(a.bt + k * OUT + j);
        for (int64_t r = 0; r < kLoraRows; ++r) acc[r] = at::vec::fmadd(Vec(h[r * width + k]), bv, acc[r]);
      }
      for (int64_t r = 0; r < kLoraRows; ++r) acc[r].store(orow[r] + j);
    }
    for (; j < OUT; ++j) {
      for (int64_t r = 0; r < kLoraRows; ++r) {
        float o = orow[r][j];
        for (int64_t k = 0; k < width; ++k) o += h[r * width + k] * a.bt[k * OUT + j];
        orow[r][j] = o;
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t t = 0; t < OUT; ++t) out[(g0 + r) * OUT + t] = static_cast<scalar_t>(orow[r][t]);
    }
  }
}
}  // namespace

void lora_rows(const LoraRowsArgs& a, int64_t r0, int64_t r1) {
  switch (a.dtype) {
    case at::kFloat:
      return lora_rows_typed<float>(a, r0, r1);
    case at::kHalf:
      return lora_rows_typed<at::Half>(a, r0, r1);
    case at::kBFloat16:
      return lora_rows_typed<at::BFloat16>(a, r0, r1);
    default:
      TORCH_CHECK(false, "dawin_ext cpu kernels: unsupported dtype ", a.dtype);
  }
}

// ---- samplewise_depthwise_conv2d ----
// Work is one output row; within it, runs of 4 output pixels that reach the same taps (the interior columns) share
// each load of a tap's mixed weights (kDepthwiseBlockVecs vectors of channels per pass, 4 x that many accumulators
// in registers); the edge pixels go one at a time (up to kDepthwiseMaxVecs vectors of channels per pass). Each lane
// (one channel) adds its terms in the order of common/samplewise_depthwise_kernel.h: bias, then taps row-major.
namespace {
namespace dwk = kernels::depthwise;
constexpr int kDepthwiseMaxVecs = 8;
constexpr int kDepthwiseBlockVecs = 4;
constexpr int kDepthwiseBlockPixels = 4;

template <bool kFull>
inline Vec depthwise_load(const float* p, int64_t lanes) {
  if constexpr (kFull) {
    return Vec::loadu(p);
  } else {
    return Vec::loadu(p, lanes);
  }
}

// NP consecutive output pixels (ow .. ow + NP - 1, all reaching taps [h0, h1) x [w0, w1)), channels [c0, c0 + n)
// in NV vectors; the last one has n - (NV - 1) * V lanes (all of them when kFullLast).
template <int NV, int NP, bool kFullLast>
void depthwise_pixels(const DepthwiseArgs& a, const float* xb, const float* mb, int64_t oh, int64_t ow, int64_t h0,
                      int64_t h1, int64_t w0, int64_t w1, int64_t c0, int64_t n, float* o) {
  constexpr int64_t V = Vec::size();
  const dwk::Geometry& g = a.g;
  const int64_t last = n - (NV - 1) * V;
  const int64_t xstep = g.sw * g.C;  // from one output pixel's input to the next one's
  Vec acc[NP][NV];
  const float* bias = mb + g.taps() * g.C + c0;
  DAWIN_UNROLL
  for (int v = 0; v < NV - 1; ++v) {
    const Vec bv = Vec::loadu(bias + v * V);
    DAWIN_UNROLL
    for (int p = 0; p < NP; ++p) acc[p][v] = bv;
  }
  {
    const Vec bv = depthwise_load<kFullLast>(bias + (NV - 1) * V, last);
    DAWIN_UNROLL
    for (int p = 0; p < NP; ++p) acc[p][NV - 1] = bv;
  }
  for (int64_t kh = h0; kh < h1; ++kh) {
    const float* xrow = xb + (oh * g.sh - g.ph + kh * g.dh) * g.W * g.C + c0;
    for (int64_t kw = w0; kw < w1; ++kw) {
      const float* wp = mb + (kh * g.KW + kw) * g.C + c0;
      const float* xp = xrow + (ow * g.sw - g.pw + kw * g.dw) * g.C;
      DAWIN_UNROLL
      for (int v = 0; v < NV - 1; ++v) {
        const Vec wv = Vec::loadu(wp + v * V);
        DAWIN_UNROLL
        for (int p = 0; p < NP; ++p) acc[p][v] = at::vec::fmadd(Vec::loadu(xp + p * xstep + v * V), wv, acc[p][v]);
      }
      const Vec wv = depthwise_load<kFullLast>(wp + (NV - 1) * V, last);
      DAWIN_UNROLL
      for (int p = 0; p < NP; ++p) {
        acc[p][NV - 1] =
            at::vec::fmadd(depthwise_load<kFullLast>(xp + p * xstep + (NV - 1) * V, last), wv, acc[p][NV - 1]);
      }
    }
  }
  DAWIN_UNROLL
  for (int p = 0; p < NP; ++p) {
    DAWIN_UNROLL
    for (int v = 0; v < NV - 1; ++v) acc[p][v].store(o + p * g.C + v * V);
    if constexpr (kFullLast) {
      acc[p][NV - 1].store(o + p * g.C + (NV - 1) * V);
    } else {
      acc[p][NV - 1].store(o + p * g.C + (NV - 1) * V, last);
    }
  }
}

using DepthwisePixelsFn = void (*)(const DepthwiseArgs&, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, int64_t, float*);
template <int NP, bool kFullLast, int... NV>
constexpr std::array<DepthwisePixelsFn, sizeof...(NV)> depthwise_table(std::integer_sequence<int, NV...>) {
  return {depthwise_pixels<NV + 1, NP, kFullLast>...};
}
// [full last vector][vectors - 1]
constexpr std::array<std::array<DepthwisePixelsFn, kDepthwiseMaxVecs>, 2> kDepthwiseOne = {
    depthwise_table<1, false>(std::make_integer_sequence<int, kDepthwiseMaxVecs>{}),
    depthwise_table<1, true>(std::make_integer_sequence<int, kDepthwiseMaxVecs>{})};
constexpr std::array<std::array<DepthwisePixelsFn, kDepthwiseBlockVecs>, 2> kDepthwiseBlock = {
    depthwise_table<kDepthwiseBlockPixels, false>(std::make_integer_sequence<int, kDepthwiseBlockVecs>{}),
    depthwise_table<kDepthwiseBlockPixels, true>(std::make_integer_sequence<int, kDepthwiseBlockVecs>{})};
}  // namespace

void depthwise_mix_rows(const DepthwiseArgs& a, int64_t r0, int64_t r1) {
  // Row r = b * (T + 1) + t of the mixed table: sum_s coef[b, s] * src_s (fp32 multiply-adds from 0, s ascending,
  // as dwk::mixed_entry), src_s the tap's [C] row of the [S, T, C] weights or (t == T) the bias row.
  constexpr int64_t V = Vec::size();
  const dwk::Geometry& g = a.g;
  const int64_t T = g.taps(), C = g.C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / (T + 1), t = r - b * (T + 1);
    float* dst = a.mixed + r * C;
    if (t == T && a.bias_t == nullptr) {
      std::fill(dst, dst + C, 0.f);
      continue;
    }
    const float* cb = a.coef + b * g.S;
    const auto src = [&](int64_t s) { return t == T ? a.bias_t + s * C : a.weights_t + (s * T + t) * C; };
    int64_t j = 0;
    for (; j + V <= C; j += V) {
      Vec acc(0.f);
      for (int64_t s = 0; s < g.S; ++s) acc = at::vec::fmadd(Vec(cb[s]), Vec::loadu(src(s) + j), acc);
      acc.store(dst + j);
    }
    for (; j < C; ++j) {
      float acc = 0.f;
      for (int64_t s = 0; s < g.S; ++s) acc = std::fma(cb[s], src(s)[j], acc);
      dst[j] = acc;
    }
  }
}

void depthwise_rows(const DepthwiseArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t V = Vec::size();
  const dwk::Geometry& g = a.g;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.OH, oh = r - b * g.OH;
    int64_t h0, h1;
    dwk::tap_range(oh, g.sh, g.ph, g.dh, g.KH, g.H, h0, h1);
    const float* xb = a.x + b * g.H * g.W * g.C;
    const float* mb = a.mixed + b * (g.taps() + 1) * g.C;
    float* orow = a.out + r * g.OW * g.C;
    int64_t ow = 0;
    while (ow < g.OW) {
      int64_t w0, w1;
      dwk::tap_range(ow, g.sw, g.pw, g.dw, g.KW, g.W, w0, w1);
      int64_t run = 1;  // following pixels that reach the same taps
      while (run < kDepthwiseBlockPixels && ow + run < g.OW) {
        int64_t u0, u1;
        dwk::tap_range(ow + run, g.sw, g.pw, g.dw, g.KW, g.W, u0, u1);
        if (u0 != w0 || u1 != w1) break;
        ++run;
      }
      const bool block = run == kDepthwiseBlockPixels;
      const int64_t chunk = (block ? kDepthwiseBlockVecs : kDepthwiseMaxVecs) * V;
      for (int64_t c0 = 0; c0 < g.C; c0 += chunk) {
        const int64_t n = std::min(chunk, g.C - c0);
        const int64_t nv = (n + V - 1) / V;
        const bool full = n == nv * V;
        const DepthwisePixelsFn fn = block ? kDepthwiseBlock[full][nv - 1] : kDepthwiseOne[full][nv - 1];
        fn(a, xb, mb, oh, ow, h0, h1, w0, w1, c0, n, orow + ow * g.C + c0);
      }
      ow += block ? kDepthwiseBlockPixels : 1;
    }
  }
}

}  // namespace DAWIN_EXT_ISA_NS
}  // namespace cpu
}  // namespace dawin_ext
