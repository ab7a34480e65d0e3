// Per-thread work, launch table and kernel choice of the CUDA multi-tensor blend
// (cuda/blend_cuda.cu), shared with its CPU grid emulation (cpu/cuda_emulation.cpp).
//
// All tensors of the state dict go into ONE launch. The host builds a table (per-tensor pointers,
// numel and dtype; per-chunk (tensor, begin) entries; the [K, S] coefficients) and launches one
// block per chunk of kChunk elements. A block blends its chunk with 16-byte vector loads/stores
// when every one of its S source and K output pointers is 16-byte aligned at the chunk start, and
// element by element otherwise (offset views); the scalar tail covers the last partial vector.
// fp32/fp16/bf16 accumulate in fp32, float64 in double.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "blend_math.h"
#include "hd.h"
#include "simt.h"

namespace dawin_ext {
namespace kernels {
namespace blend {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 65536;  // elements per block; a multiple of every vector width

enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct ChunkEntry {
  int64_t tensor;
  int64_t begin;
};

// Views of the sections of the table (one allocation, on the device or, emulated, on the host).
struct BlendTable {
  const float* coef_f;       // [K * S]
  const double* coef_d;      // [K * S]
  const void* const* src;    // [n * S + s]
  void* const* dst;          // [n * K + k]
  const int64_t* numel;      // [N]
  const int32_t* dtype;      // [N]
  const ChunkEntry* chunks;  // [num_chunks]
};

// A chunk with every one of its S + K pointers aligned for 16-byte vector access at `begin`.
template <typename scalar_t>
DAWIN_HD bool chunk_aligned(const scalar_t* const* src, int S, scalar_t* const* dst, int K, int64_t begin) {
  bool aligned = true;
  for (int s = 0; s < S; ++s) aligned &= simt::is_aligned(src[s] + begin, simt::kVecBytes);
  for (int k = 0; k < K; ++k) aligned &= simt::is_aligned(dst[k] + begin, simt::kVecBytes);
  return aligned;
}

// Thread `tid` of `threads` blends its share of chunk [begin, begin + kChunk) of tensor n, with all
// S sources of an element group in registers (S_ / K_ > 0 fix S / K at compile time).
template <int S_, int K_, typename scalar_t>
DAWIN_HD void blend_chunk(const BlendTable& t, const int64_t n, const int64_t begin, const int S, const int K,
                          const typename math::BlendAcc<scalar_t>::type* coef, const int tid, const int threads) {
  using acc_t = typename math::BlendAcc<scalar_t>::type;
  constexpr int kS = S_ > 0 ? S_ : math::kMaxSources;  // loop bounds, fully unrolled with guards
  constexpr int kK = K_ > 0 ? K_ : math::kMaxClusters;
  constexpr int V = simt::VecWidth<scalar_t>::value;
  const int64_t numel = t.numel[n];
  const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
  const scalar_t* src[kS];
  scalar_t* dst[kK];
  DAWIN_UNROLL
  for (int s = 0; s < kS; ++s) {
    if (s < S) src[s] = static_cast<const scalar_t*>(t.src[n * S + s]);
  }
  DAWIN_UNROLL
  for (int k = 0; k < kK; ++k) {
    if (k < K) dst[k] = static_cast<scalar_t*>(t.dst[n * K + k]);
  }
  int64_t i = begin;
  if (chunk_aligned<scalar_t>(src, S, dst, K, begin)) {
    using P = simt::Pack<scalar_t, V>;
    const int64_t nvec = (end - begin) / V;
    for (int64_t j = tid; j < nvec; j += threads) {
      const int64_t e = begin + j * V;
      acc_t x[kS][V];
      DAWIN_UNROLL
      for (int s = 0; s < kS; ++s) {
        if (s < S) {
          const P p = *reinterpret_cast<const P*>(src[s] + e);
          DAWIN_UNROLL
          for (int v = 0; v < V; ++v) x[s][v] = static_cast<acc_t>(p.v[v]);
        }
      }
      DAWIN_UNROLL
      for (int k = 0; k < kK; ++k) {
        if (k < K) {
          P o;
          DAWIN_UNROLL
          for (int v = 0; v < V; ++v) {
            acc_t acc = coef[k * S] * x[0][v];
            DAWIN_UNROLL
            for (int s = 1; s < kS; ++s) {
              if (s < S) acc += coef[k * S + s] * x[s][v];
            }
            o.v[v] = static_cast<scalar_t>(acc);
          }
          *reinterpret_cast<P*>(dst[k] + e) = o;
        }
      }
    }
    i = begin + nvec * V;
  }
  // Scalar path: the tail, or the whole chunk when some pointer is misaligned.
  for (int64_t e = i + tid; e < end; e += threads) {
    acc_t x[kS];
    DAWIN_UNROLL
    for (int s = 0; s < kS; ++s) {
      if (s < S) x[s] = static_cast<acc_t>(src[s][e]);
    }
    DAWIN_UNROLL
    for (int k = 0; k < kK; ++k) {
      if (k < K) dst[k][e] = static_cast<scalar_t>(math::blend_dot<S_, acc_t>(x, coef + k * S, S));
    }
  }
}

// Runtime S and K without keeping all S sources in registers (which spills for large S): each
// output re-reads the S source vectors, which the thread has just loaded, from L1. Only valid when
// no output overlaps a source (an in-place blend would read already-blended values).
template <typename scalar_t>
DAWIN_HD void blend_chunk_reread(const BlendTable& t, const int64_t n, const int64_t begin, const int S, const int K,
                                 const typename math::BlendAcc<scalar_t>::type* coef, const int tid,
                                 const int threads) {
  using acc_t = typename math::BlendAcc<scalar_t>::type;
  constexpr int V = simt::VecWidth<scalar_t>::value;
  using P = simt::Pack<scalar_t, V>;
  const int64_t numel = t.numel[n];
  const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
  const scalar_t* const* src = reinterpret_cast<const scalar_t* const*>(t.src + n * S);
  scalar_t* const* dst = reinterpret_cast<scalar_t* const*>(t.dst + n * K);
  int64_t i = begin;
  if (chunk_aligned<scalar_t>(src, S, dst, K, begin)) {
    const int64_t nvec = (end - begin) / V;
    for (int64_t j = tid; j < nvec; j += threads) {
      const int64_t e = begin + j * V;
      for (int k = 0; k < K; ++k) {
        acc_t acc[V];
        const P p0 = *reinterpret_cast<const P*>(src[0] + e);
        DAWIN_UNROLL
        for (int v = 0; v < V; ++v) acc[v] = coef[k * S] * static_cast<acc_t>(p0.v[v]);
        for (int s = 1; s < S; ++s) {
          const P p = *reinterpret_cast<const P*>(src[s] + e);
          DAWIN_UNROLL
          for (int v = 0; v < V; ++v) acc[v] += coef[k * S + s] * static_cast<acc_t>(p.v[v]);
        }
        P o;
        DAWIN_UNROLL
        for (int v = 0; v < V; ++v) o.v[v] = static_cast<scalar_t>(acc[v]);
        *reinterpret_cast<P*>(dst[k] + e) = o;
      }
    }
    i = begin + nvec * V;
  }
  for (int64_t e = i + tid; e < end; e += threads) {
    for (int k = 0; k < K; ++k) {
      acc_t acc = coef[k * S] * static_cast<acc_t>(src[0][e]);
      for (int s = 1; s < S; ++s) acc += coef[k * S + s] * static_cast<acc_t>(src[s][e]);
      dst[k][e] = static_cast<scalar_t>(acc);
    }
  }
}

template <bool kReread, int S_, int K_, typename scalar_t>
DAWIN_HD void blend_chunk_any(const BlendTable& t, const int64_t n, const int64_t begin, const int S, const int K,
                              const typename math::BlendAcc<scalar_t>::type* coef, const int tid, const int threads) {
  if constexpr (kReread) {
    blend_chunk_reread<scalar_t>(t, n, begin, S, K, coef, tid, threads);
  } else {
    blend_chunk<S_, K_, scalar_t>(t, n, begin, S, K, coef, tid, threads);
  }
}

// Step 1 of a block: the threads copy the [K, S] coefficients into shared memory (coef_f and coef_d
// hold kMaxSources * kMaxClusters entries each). A barrier follows.
DAWIN_HD void load_coefficients(const BlendTable& t, const int S, const int K, float* coef_f, double* coef_d,
                                const int tid, const int threads) {
  for (int j = tid; j < S * K; j += threads) {
    coef_f[j] = t.coef_f[j];
    coef_d[j] = t.coef_d[j];
  }
}

// Step 2: thread `tid` blends its share of the block's chunk; the chunk's tensor decides the dtype
// (uniform within a block).
template <bool kReread, int S_, int K_>
DAWIN_HD void blend_block(const BlendTable& t, const int64_t block, const int S, const int K, const float* coef_f,
                          const double* coef_d, const int tid, const int threads) {
  const ChunkEntry c = t.chunks[block];
  switch (t.dtype[c.tensor]) {
    case kF32:
      blend_chunk_any<kReread, S_, K_, float>(t, c.tensor, c.begin, S, K, coef_f, tid, threads);
      break;
    case kF64:
      blend_chunk_any<kReread, S_, K_, double>(t, c.tensor, c.begin, S, K, coef_d, tid, threads);
      break;
    case kF16:
      blend_chunk_any<kReread, S_, K_, c10::Half>(t, c.tensor, c.begin, S, K, coef_f, tid, threads);
      break;
    case kBF16:
      blend_chunk_any<kReread, S_, K_, c10::BFloat16>(t, c.tensor, c.begin, S, K, coef_f, tid, threads);
      break;
    default:
      break;  // unreachable: dtypes are checked on the host
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: the kernel choice and the launch table.
// ---------------------------------------------------------------------------------------------

// The compiled specialisations of blend_kernel<kReread, S_, K_>.
enum class Kernel : int { kS2K1, kS2K2, kS2K3, kS2K4, kReread, kGeneric };
constexpr int kNumKernels = 6;

inline const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::kS2K1:
      return "S2K1";
    case Kernel::kS2K2:
      return "S2K2";
    case Kernel::kS2K3:
      return "S2K3";
    case Kernel::kS2K4:
      return "S2K4";
    case Kernel::kReread:
      return "reread";
    case Kernel::kGeneric:
      return "generic";
  }
  return "?";
}

// Two sources with up to four outputs have fixed-size kernels; otherwise the re-read kernel, unless
// an output overlaps a source (an in-place blend), which needs all sources in registers first.
inline Kernel choose_kernel(int64_t S, int64_t K, bool outputs_overlap_sources) {
  if (S == 2 && K >= 1 && K <= 4) return static_cast<Kernel>(static_cast<int>(Kernel::kS2K1) + (K - 1));
  return outputs_overlap_sources ? Kernel::kGeneric : Kernel::kReread;
}

// Whether kernel k computes a blend of S sources into K outputs correctly.
inline bool kernel_fits(Kernel k, int64_t S, int64_t K, bool outputs_overlap_sources) {
  switch (k) {
    case Kernel::kS2K1:
    case Kernel::kS2K2:
    case Kernel::kS2K3:
    case Kernel::kS2K4:
      return S == 2 && K == static_cast<int>(k) - static_cast<int>(Kernel::kS2K1) + 1;
    case Kernel::kReread:
      return !outputs_overlap_sources;
    case Kernel::kGeneric:
      return true;
  }
  return false;
}

// Calls f(reread, S_, K_) with the compile-time parameters of kernel k (std::integral_constant).
template <typename F>
void with_kernel(Kernel k, F&& f) {
  using R0 = std::false_type;
  using R1 = std::true_type;
  switch (k) {
    case Kernel::kS2K1:
      return f(R0{}, std::integral_constant<int, 2>{}, std::integral_constant<int, 1>{});
    case Kernel::kS2K2:
      return f(R0{}, std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{});
    case Kernel::kS2K3:
      return f(R0{}, std::integral_constant<int, 2>{}, std::integral_constant<int, 3>{});
    case Kernel::kS2K4:
      return f(R0{}, std::integral_constant<int, 2>{}, std::integral_constant<int, 4>{});
    case Kernel::kReread:
      return f(R1{}, std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
    case Kernel::kGeneric:
      return f(R0{}, std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
  }
  TORCH_CHECK(false, "blend: unknown kernel ", static_cast<int>(k));
}

inline int32_t dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat:
      return kF32;
    case c10::kDouble:
      return kF64;
    case c10::kHalf:
      return kF16;
    case c10::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK_TYPE(false, "blend: unsupported dtype ", t);
  }
}

inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// One chunk entry per kChunk elements of every tensor; one block each.
inline std::vector<ChunkEntry> make_chunks(const std::vector<int64_t>& numel) {
  std::vector<ChunkEntry> chunks;
  for (int64_t n = 0; n < static_cast<int64_t>(numel.size()); ++n) {
    for (int64_t b = 0; b < numel[n]; b += kChunk) chunks.push_back({n, b});
  }
  return chunks;
}

// Byte offsets of the table's sections (every section 16-byte aligned) and its size.
struct TableLayout {
  int64_t coef_f, coef_d, src, dst, numel, dtype, chunks, bytes;
};

inline TableLayout table_layout(int64_t N, int64_t S, int64_t K, int64_t num_chunks) {
  TableLayout L;
  const int64_t KS = K * S;
  L.coef_f = 0;
  L.coef_d = align_up(L.coef_f + KS * 4, 16);
  L.src = align_up(L.coef_d + KS * 8, 16);
  L.dst = align_up(L.src + N * S * 8, 16);
  L.numel = align_up(L.dst + N * K * 8, 16);
  L.dtype = align_up(L.numel + N * 8, 16);
  L.chunks = align_up(L.dtype + N * 4, 16);
  L.bytes = L.chunks + num_chunks * static_cast<int64_t>(sizeof(ChunkEntry));
  return L;
}

// Writes the table into h (L.bytes bytes). coef: [K, S] doubles; src: the op's S * N source
// pointers, source-major (src[s * N + n]); dst: the K * N output pointers, cluster-major.
inline void fill_table(uint8_t* h, const TableLayout& L, int64_t N, int64_t S, int64_t K, const double* coef,
                       const std::vector<const void*>& src, const std::vector<void*>& dst,
                       const std::vector<int64_t>& numel, const std::vector<int32_t>& dtype,
                       const std::vector<ChunkEntry>& chunks) {
  for (int64_t j = 0; j < K * S; ++j) {
    reinterpret_cast<float*>(h + L.coef_f)[j] = static_cast<float>(coef[j]);
    reinterpret_cast<double*>(h + L.coef_d)[j] = coef[j];
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t s = 0; s < S; ++s) reinterpret_cast<const void**>(h + L.src)[n * S + s] = src[s * N + n];
    for (int64_t k = 0; k < K; ++k) reinterpret_cast<void**>(h + L.dst)[n * K + k] = dst[k * N + n];
    reinterpret_cast<int64_t*>(h + L.numel)[n] = numel[n];
    reinterpret_cast<int32_t*>(h + L.dtype)[n] = dtype[n];
  }
  std::memcpy(h + L.chunks, chunks.data(), chunks.size() * sizeof(ChunkEntry));
}

// The table's sections at base (a device pointer on the GPU, a host pointer emulated).
inline BlendTable table_view(const uint8_t* base, const TableLayout& L) {
  BlendTable t;
  t.coef_f = reinterpret_cast<const float*>(base + L.coef_f);
  t.coef_d = reinterpret_cast<const double*>(base + L.coef_d);
  t.src = reinterpret_cast<const void* const*>(base + L.src);
  t.dst = reinterpret_cast<void* const*>(base + L.dst);
  t.numel = reinterpret_cast<const int64_t*>(base + L.numel);
  t.dtype = reinterpret_cast<const int32_t*>(base + L.dtype);
  t.chunks = reinterpret_cast<const ChunkEntry*>(base + L.chunks);
  return t;
}

}  // namespace blend
}  // namespace kernels
}  // namespace dawin_ext
