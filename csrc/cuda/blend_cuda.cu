// CUDA multi-tensor blend: all tensors of the state dict in ONE launch.
//
// The S + K pointer lists of a ~300-tensor state dict do not fit in the kernel-argument budget, so
// the host builds a table (per-tensor pointers, numel and dtype; per-chunk (tensor, begin) entries;
// the [K, S] coefficients) in pinned memory from the caching host allocator, copies it to the
// device with a non-blocking copy_ on the current stream (copy_ records the stream on the pinned
// block, so the host buffer is not reused before the copy has run), and launches one block per
// chunk of kChunk elements. A block blends its chunk with 16-byte vector loads/stores when every
// one of its S source and K output pointers is 16-byte aligned at the chunk start, and element by
// element otherwise (offset views); the scalar tail covers the last partial vector.
// fp32/fp16/bf16 accumulate in fp32, float64 in double.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/blend_math.h"
#include "../ops.h"

namespace dawin_ext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 65536;  // elements per block; a multiple of every vector width
constexpr int kVecBytes = 16;

enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct ChunkEntry {
  int64_t tensor;
  int64_t begin;
};

// Device views of the sections of the table (one device allocation).
struct BlendTable {
  const float* coef_f;       // [K * S]
  const double* coef_d;      // [K * S]
  const void* const* src;    // [n * S + s]
  void* const* dst;          // [n * K + k]
  const int64_t* numel;      // [N]
  const int32_t* dtype;      // [N]
  const ChunkEntry* chunks;  // [num_chunks]
};

template <typename T, int kN>
struct alignas(sizeof(T) * kN) BlendPack {
  T v[kN];
};

template <int S_, int K_, typename scalar_t>
__device__ __forceinline__ void blend_chunk(const BlendTable& t, const int64_t n, const int64_t begin, const int S,
                                            const int K, const typename math::BlendAcc<scalar_t>::type* coef) {
  using acc_t = typename math::BlendAcc<scalar_t>::type;
  constexpr int kS = S_ > 0 ? S_ : math::kMaxSources;  // loop bounds, fully unrolled with guards
  constexpr int kK = K_ > 0 ? K_ : math::kMaxClusters;
  constexpr int V = kVecBytes / static_cast<int>(sizeof(scalar_t));
  const int64_t numel = t.numel[n];
  const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
  const scalar_t* src[kS];
  scalar_t* dst[kK];
  bool aligned = true;
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    if (s < S) {
      src[s] = static_cast<const scalar_t*>(t.src[n * S + s]);
      aligned &= (reinterpret_cast<uintptr_t>(src[s] + begin) % kVecBytes) == 0;
    }
  }
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    if (k < K) {
      dst[k] = static_cast<scalar_t*>(t.dst[n * K + k]);
      aligned &= (reinterpret_cast<uintptr_t>(dst[k] + begin) % kVecBytes) == 0;
    }
  }
  int64_t i = begin;
  if (aligned) {
    using P = BlendPack<scalar_t, V>;
    const int64_t nvec = (end - begin) / V;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t e = begin + j * V;
      acc_t x[kS][V];
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        if (s < S) {
          const P p = *reinterpret_cast<const P*>(src[s] + e);
#pragma unroll
          for (int v = 0; v < V; ++v) x[s][v] = static_cast<acc_t>(p.v[v]);
        }
      }
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        if (k < K) {
          P o;
#pragma unroll
          for (int v = 0; v < V; ++v) {
            acc_t acc = coef[k * S] * x[0][v];
#pragma unroll
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
  for (int64_t e = i + threadIdx.x; e < end; e += blockDim.x) {
    acc_t x[kS];
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      if (s < S) x[s] = static_cast<acc_t>(src[s][e]);
    }
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      if (k < K) dst[k][e] = static_cast<scalar_t>(math::blend_dot<S_, acc_t>(x, coef + k * S, S));
    }
  }
}

// Runtime S and K without keeping all S sources in registers (which spills for large S): each
// output re-reads the S source vectors, which the thread has just loaded, from L1. Only valid when
// no output overlaps a source (an in-place blend would read already-blended values).
template <typename scalar_t>
__device__ __forceinline__ void blend_chunk_reread(const BlendTable& t, const int64_t n, const int64_t begin,
                                                   const int S, const int K,
                                                   const typename math::BlendAcc<scalar_t>::type* coef) {
  using acc_t = typename math::BlendAcc<scalar_t>::type;
  using P = BlendPack<scalar_t, kVecBytes / static_cast<int>(sizeof(scalar_t))>;
  constexpr int V = kVecBytes / static_cast<int>(sizeof(scalar_t));
  const int64_t numel = t.numel[n];
  const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
  const scalar_t* const* src = reinterpret_cast<const scalar_t* const*>(t.src + n * S);
  scalar_t* const* dst = reinterpret_cast<scalar_t* const*>(t.dst + n * K);
  bool aligned = true;
  for (int s = 0; s < S; ++s) aligned &= (reinterpret_cast<uintptr_t>(src[s] + begin) % kVecBytes) == 0;
  for (int k = 0; k < K; ++k) aligned &= (reinterpret_cast<uintptr_t>(dst[k] + begin) % kVecBytes) == 0;
  int64_t i = begin;
  if (aligned) {
    const int64_t nvec = (end - begin) / V;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t e = begin + j * V;
      for (int k = 0; k < K; ++k) {
        acc_t acc[V];
        const P p0 = *reinterpret_cast<const P*>(src[0] + e);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = coef[k * S] * static_cast<acc_t>(p0.v[v]);
        for (int s = 1; s < S; ++s) {
          const P p = *reinterpret_cast<const P*>(src[s] + e);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += coef[k * S + s] * static_cast<acc_t>(p.v[v]);
        }
        P o;
#pragma unroll
        for (int v = 0; v < V; ++v) o.v[v] = static_cast<scalar_t>(acc[v]);
        *reinterpret_cast<P*>(dst[k] + e) = o;
      }
    }
    i = begin + nvec * V;
  }
  for (int64_t e = i + threadIdx.x; e < end; e += blockDim.x) {
    for (int k = 0; k < K; ++k) {
      acc_t acc = coef[k * S] * static_cast<acc_t>(src[0][e]);
      for (int s = 1; s < S; ++s) acc += coef[k * S + s] * static_cast<acc_t>(src[s][e]);
      dst[k][e] = static_cast<scalar_t>(acc);
    }
  }
}

template <bool kReread, int S_, int K_, typename scalar_t>
__device__ __forceinline__ void blend_chunk_any(const BlendTable& t, const int64_t n, const int64_t begin, const int S,
                                                const int K, const typename math::BlendAcc<scalar_t>::type* coef) {
  if constexpr (kReread) {
    blend_chunk_reread<scalar_t>(t, n, begin, S, K, coef);
  } else {
    blend_chunk<S_, K_, scalar_t>(t, n, begin, S, K, coef);
  }
}

// One block per chunk; the chunk's tensor decides the dtype (uniform within a block).
template <bool kReread, int S_, int K_>
__global__ void __launch_bounds__(kThreads) blend_kernel(const BlendTable t, const int S, const int K) {
  __shared__ float coef_f[math::kMaxSources * math::kMaxClusters];
  __shared__ double coef_d[math::kMaxSources * math::kMaxClusters];
  for (int j = threadIdx.x; j < S * K; j += blockDim.x) {
    coef_f[j] = t.coef_f[j];
    coef_d[j] = t.coef_d[j];
  }
  __syncthreads();
  const ChunkEntry c = t.chunks[blockIdx.x];
  switch (t.dtype[c.tensor]) {
    case kF32:
      blend_chunk_any<kReread, S_, K_, float>(t, c.tensor, c.begin, S, K, coef_f);
      break;
    case kF64:
      blend_chunk_any<kReread, S_, K_, double>(t, c.tensor, c.begin, S, K, coef_d);
      break;
    case kF16:
      blend_chunk_any<kReread, S_, K_, c10::Half>(t, c.tensor, c.begin, S, K, coef_f);
      break;
    case kBF16:
      blend_chunk_any<kReread, S_, K_, c10::BFloat16>(t, c.tensor, c.begin, S, K, coef_f);
      break;
    default:
      break;  // unreachable: dtypes are checked on the host
  }
}

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kDouble:
      return kF64;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK_TYPE(false, "blend: unsupported dtype ", t);
  }
}

int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

}  // namespace

void blend_cuda(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out) {
  check_blend_args(sources, coefficients, out);
  // Refuses every sharing between outputs and sources except an output that is exactly the source of its
  // own index; for those, the kernel that keeps all sources in registers runs (the re-read one would
  // read already-written values).
  const bool outputs_overlap_sources = check_blend_aliasing(sources, coefficients, out);
  const int64_t K = coefficients.size(0);
  const int64_t S = coefficients.size(1);
  const int64_t N = static_cast<int64_t>(sources.size()) / S;
  if (N == 0) return;
  const at::Device device = sources[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "blend: the CUDA kernel got tensors on ", device);
  c10::cuda::CUDAGuard guard(device);
  const at::Tensor coef = coefficients.detach().to(at::kCPU, at::kDouble).contiguous();

  // Strided sources are made contiguous (stream-ordered copies that live until the kernel ran).
  std::vector<at::Tensor> src_c(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) src_c[i] = sources[i].contiguous();

  std::vector<ChunkEntry> chunks;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t b = 0; b < src_c[n].numel(); b += kChunk) chunks.push_back({n, b});
  }
  if (chunks.empty()) return;
  TORCH_CHECK(chunks.size() < (size_t{1} << 31), "blend: too many chunks for one launch (", chunks.size(), ")");

  // Table layout: every section 16-byte aligned.
  const int64_t KS = K * S;
  const int64_t off_coef_f = 0;
  const int64_t off_coef_d = align_up(off_coef_f + KS * 4, 16);
  const int64_t off_src = align_up(off_coef_d + KS * 8, 16);
  const int64_t off_dst = align_up(off_src + N * S * 8, 16);
  const int64_t off_numel = align_up(off_dst + N * K * 8, 16);
  const int64_t off_dtype = align_up(off_numel + N * 8, 16);
  const int64_t off_chunks = align_up(off_dtype + N * 4, 16);
  const int64_t bytes = off_chunks + static_cast<int64_t>(chunks.size() * sizeof(ChunkEntry));

  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  const double* cd = coef.const_data_ptr<double>();
  for (int64_t j = 0; j < KS; ++j) {
    reinterpret_cast<float*>(h + off_coef_f)[j] = static_cast<float>(cd[j]);
    reinterpret_cast<double*>(h + off_coef_d)[j] = cd[j];
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t s = 0; s < S; ++s) {
      reinterpret_cast<const void**>(h + off_src)[n * S + s] = src_c[s * N + n].const_data_ptr();
    }
    for (int64_t k = 0; k < K; ++k) reinterpret_cast<void**>(h + off_dst)[n * K + k] = out[k * N + n].data_ptr();
    reinterpret_cast<int64_t*>(h + off_numel)[n] = src_c[n].numel();
    reinterpret_cast<int32_t*>(h + off_dtype)[n] = dtype_code(src_c[n].scalar_type());
  }
  std::memcpy(h + off_chunks, chunks.data(), chunks.size() * sizeof(ChunkEntry));

  at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);
  const uint8_t* d = dev.const_data_ptr<uint8_t>();
  BlendTable t;
  t.coef_f = reinterpret_cast<const float*>(d + off_coef_f);
  t.coef_d = reinterpret_cast<const double*>(d + off_coef_d);
  t.src = reinterpret_cast<const void* const*>(d + off_src);
  t.dst = reinterpret_cast<void* const*>(d + off_dst);
  t.numel = reinterpret_cast<const int64_t*>(d + off_numel);
  t.dtype = reinterpret_cast<const int32_t*>(d + off_dtype);
  t.chunks = reinterpret_cast<const ChunkEntry*>(d + off_chunks);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(chunks.size()));
  const int s = static_cast<int>(S), k = static_cast<int>(K);
  if (S == 2 && K == 1) {
    blend_kernel<false, 2, 1><<<grid, kThreads, 0, stream>>>(t, s, k);
  } else if (S == 2 && K == 2) {
    blend_kernel<false, 2, 2><<<grid, kThreads, 0, stream>>>(t, s, k);
  } else if (S == 2 && K == 3) {
    blend_kernel<false, 2, 3><<<grid, kThreads, 0, stream>>>(t, s, k);
  } else if (S == 2 && K == 4) {
    blend_kernel<false, 2, 4><<<grid, kThreads, 0, stream>>>(t, s, k);
  } else if (!outputs_overlap_sources) {
    blend_kernel<true, 0, 0><<<grid, kThreads, 0, stream>>>(t, s, k);
  } else {
    blend_kernel<false, 0, 0><<<grid, kThreads, 0, stream>>>(t, s, k);  // in place: all sources in registers
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // `dev` and the contiguous copies are freed to the caching allocator after this point; their
  // reuse is ordered after the kernel on this stream.
}

}  // namespace dawin_ext

TORCH_LIBRARY_IMPL(dawin_ext, CUDA, m) { m.impl("blend_", &dawin_ext::blend_cuda); }
