// SIMD body of the CPU blend kernel. NOT a normal header: blend_cpu.cpp includes it once per
// instruction set, inside `#pragma GCC target(...)` and its own namespace, with DAWIN_VB set to the
// vector width in bytes (32: AVX2+FMA+F16C, 64: AVX512F/BW/VL/DQ). Everything it uses from outside
// (immintrin.h, c10 types, the scalar tail) is included/defined before the pragma, so that no inline
// function shared with other translation units is compiled for a wider ISA than the baseline.
// No std:: templates are instantiated here for the same reason.

#ifndef DAWIN_VB
#error "blend_cpu_simd.h must be included by blend_cpu.cpp with DAWIN_VB defined"
#endif

typedef float vfloat __attribute__((vector_size(DAWIN_VB), may_alias));
typedef double vdouble __attribute__((vector_size(DAWIN_VB), may_alias));
typedef uint32_t vu32 __attribute__((vector_size(DAWIN_VB), may_alias));
typedef int32_t vi32 __attribute__((vector_size(DAWIN_VB), may_alias));
typedef uint16_t vu16 __attribute__((vector_size(DAWIN_VB / 2), may_alias));

// Load/convert/store of one vector of W elements of scalar_t, widened to the accumulation type.
template <typename scalar_t>
struct Io;

template <>
struct Io<float> {
  using V = vfloat;
  static constexpr int W = DAWIN_VB / 4;
  static inline V load(const float* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(float* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  static inline void stream(float* p, V v) {  // p aligned to DAWIN_VB
#if DAWIN_VB == 64
    _mm512_stream_ps(p, (__m512)v);
#else
    _mm256_stream_ps(p, (__m256)v);
#endif
  }
};

template <>
struct Io<double> {
  using V = vdouble;
  static constexpr int W = DAWIN_VB / 8;
  static inline V load(const double* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(double* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  static inline void stream(double* p, V v) {
#if DAWIN_VB == 64
    _mm512_stream_pd(p, (__m512d)v);
#else
    _mm256_stream_pd(p, (__m256d)v);
#endif
  }
};

// Half-width raw vector (W 16-bit elements) stores, plain and non-temporal.
static inline void store_u16(void* p, vu16 v) { __builtin_memcpy(p, &v, sizeof(vu16)); }
static inline void stream_u16(void* p, vu16 v) {
#if DAWIN_VB == 64
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)v);
#else
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)v);
#endif
}

template <>
struct Io<c10::Half> {
  using V = vfloat;
  static constexpr int W = DAWIN_VB / 4;
  static inline V load(const c10::Half* p) {
#if DAWIN_VB == 64
    return (V)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
    return (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  }
  // Round to nearest even, like c10::Half's conversion.
  static inline vu16 narrow(V v) {
#if DAWIN_VB == 64
    return (vu16)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    return (vu16)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  }
  static inline void store(c10::Half* p, V v) { store_u16(p, narrow(v)); }
  static inline void stream(c10::Half* p, V v) { stream_u16(p, narrow(v)); }
};

template <>
struct Io<c10::BFloat16> {
  using V = vfloat;
  static constexpr int W = DAWIN_VB / 4;
  static inline V load(const c10::BFloat16* p) {
    vu16 h;
    __builtin_memcpy(&h, p, sizeof(vu16));
    return (V)(__builtin_convertvector(h, vu32) << 16);
  }
  // Round to nearest even with NaN -> 0x7FC0, bit for bit like c10::BFloat16(float).
  static inline vu16 narrow(V v) {
    const vu32 u = (vu32)v;
    const vu32 rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
    const vu32 r = (v != v) ? (vu32){} + 0x7fc0u : rounded;
    return __builtin_convertvector(r, vu16);
  }
  static inline void store(c10::BFloat16* p, V v) { store_u16(p, narrow(v)); }
  static inline void stream(c10::BFloat16* p, V v) { stream_u16(p, narrow(v)); }
};

// Blends elements [begin, end) of one tensor: dst[k][i] = sum_s coef[k * S + s] * src[s][i].
// S_/K_ > 0 fix the counts at compile time (the common S = 2 case); 0 means use S/K.
// `stream` asks for non-temporal stores (outputs far larger than the caches): they are used from
// the first index where every dst[k] is DAWIN_VB-aligned, if that index is the same for all k.
template <typename scalar_t, int S_, int K_>
void blend_range(const scalar_t* const* src, scalar_t* const* dst, const typename Io<scalar_t>::V* coef_v,
                 const typename math::BlendAcc<scalar_t>::type* coef, int num_sources, int num_clusters, int64_t begin,
                 int64_t end, bool stream) {
  using IoT = Io<scalar_t>;
  using V = typename IoT::V;
  constexpr int W = IoT::W;
  const int S = S_ > 0 ? S_ : num_sources;
  const int K = K_ > 0 ? K_ : num_clusters;
  int64_t i = begin;
  bool nt = false;
  if (stream) {
    // Elements to the first aligned address of dst[0]; all outputs must agree.
    constexpr uintptr_t mask = DAWIN_VB - 1;
    const uintptr_t a0 = reinterpret_cast<uintptr_t>(dst[0] + begin);
    const int64_t head = static_cast<int64_t>(((DAWIN_VB - (a0 & mask)) & mask) / sizeof(scalar_t));
    nt = (a0 % sizeof(scalar_t)) == 0;
    for (int k = 1; k < K && nt; ++k) nt = ((reinterpret_cast<uintptr_t>(dst[k] + begin) ^ a0) & mask) == 0;
    if (nt) {
      const int64_t stop = begin + head < end ? begin + head : end;
      blend_scalar_range<scalar_t>(src, dst, coef, S, K, begin, stop);
      i = stop;
    }
  }
  V x[S_ > 0 ? S_ : math::kMaxSources];
  for (; i + W <= end; i += W) {
#pragma GCC unroll 16
    for (int s = 0; s < (S_ > 0 ? S_ : math::kMaxSources); ++s) {
      if (S_ == 0 && s >= S) break;
      x[s] = IoT::load(src[s] + i);
    }
#pragma GCC unroll 16
    for (int k = 0; k < (K_ > 0 ? K_ : math::kMaxClusters); ++k) {
      if (K_ == 0 && k >= K) break;
      const V* c = coef_v + k * S;
      V acc = c[0] * x[0];
#pragma GCC unroll 16
      for (int s = 1; s < (S_ > 0 ? S_ : math::kMaxSources); ++s) {
        if (S_ == 0 && s >= S) break;
        acc += c[s] * x[s];
      }
      if (nt) {
        IoT::stream(dst[k] + i, acc);
      } else {
        IoT::store(dst[k] + i, acc);
      }
    }
  }
  blend_scalar_range<scalar_t>(src, dst, coef, S, K, i, end);
  if (nt) _mm_sfence();  // order the weakly-ordered streaming stores before the join
}

// blend_rows_f32 (blend_cpu.h) for this instruction set: each row is one K = 1 blend_range, in cache.
void blend_rows(const float* src0, int64_t source_stride, int64_t row_stride, const float* coef, int S, int64_t rows,
                int64_t cols, float* dst) {
  vfloat coef_v[math::kMaxSources];
  for (int s = 0; s < S; ++s) coef_v[s] = (vfloat){} + coef[s];
  using Fn =
      void (*)(const float* const*, float* const*, const vfloat*, const float*, int, int, int64_t, int64_t, bool);
  Fn fn = &blend_range<float, 0, 1>;
  if (S == 2) fn = &blend_range<float, 2, 1>;
  if (S == 3) fn = &blend_range<float, 3, 1>;
  const float* src[math::kMaxSources];
  for (int64_t r = 0; r < rows; ++r) {
    for (int s = 0; s < S; ++s) src[s] = src0 + s * source_stride + r * row_stride;
    float* out = dst + r * cols;
    fn(src, &out, coef_v, coef, S, 1, 0, cols, /*stream=*/false);
  }
}

// One instantiation table per dtype: fixed S = 2 with K = 1..4 (WiSE-FT / DaWin clusters), S = 3
// with K = 1..3, and the runtime-count loop for everything else.
template <typename scalar_t>
void blend_items(const BlendPlan& plan, int64_t i0, int64_t i1) {
  using V = typename Io<scalar_t>::V;
  using acc_t = typename math::BlendAcc<scalar_t>::type;
  const int S = plan.num_sources, K = plan.num_clusters;
  const acc_t* coef = plan.coef<acc_t>();
  V coef_v[math::kMaxSources * math::kMaxClusters];
  for (int j = 0; j < S * K; ++j) coef_v[j] = (V){} + coef[j];
  using Fn =
      void (*)(const scalar_t* const*, scalar_t* const*, const V*, const acc_t*, int, int, int64_t, int64_t, bool);
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

// Runs items [i0, i1) of the plan; consecutive items of the same dtype go to one blend_items call.
void run_items(const BlendPlan& plan, int64_t i0, int64_t i1) {
  int64_t a = i0;
  while (a < i1) {
    const at::ScalarType t = plan.dtypes[plan.items[a].tensor];
    int64_t b = a + 1;
    while (b < i1 && plan.dtypes[plan.items[b].tensor] == t) ++b;
    switch (t) {
      case at::kFloat:
        blend_items<float>(plan, a, b);
        break;
      case at::kDouble:
        blend_items<double>(plan, a, b);
        break;
      case at::kHalf:
        blend_items<c10::Half>(plan, a, b);
        break;
      case at::kBFloat16:
        blend_items<c10::BFloat16>(plan, a, b);
        break;
      default:
        __builtin_trap();  // dtypes were checked by check_blend_args
    }
    a = b;
  }
}
