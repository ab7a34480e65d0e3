// CUDA multi-tensor blend: all tensors of the state dict in ONE launch.
//
// The S + K pointer lists of a ~300-tensor state dict do not fit in the kernel-argument budget, so
// the host builds a table (common/blend_kernel.h) in pinned memory from the caching host allocator,
// copies it to the device with a non-blocking copy_ on the current stream (copy_ records the stream
// on the pinned block, so the host buffer is not reused before the copy has run), and launches one
// block per chunk. The per-thread work (vector or scalar path, head and tail, the accumulation) and
// the choice of specialisation are in common/blend_kernel.h, which the CPU grid emulator
// (cpu/cuda_emulation.cpp) runs too.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../common/blend_kernel.h"
#include "../common/kernel_host.h"
#include "../ops.h"

namespace dawin_ext {
namespace {

namespace bk = kernels::blend;

template <bool kReread, int S_, int K_>
__global__ void __launch_bounds__(bk::kThreads) blend_kernel(const bk::BlendTable t, const int S, const int K) {
  __shared__ float coef_f[math::kMaxSources * math::kMaxClusters];
  __shared__ double coef_d[math::kMaxSources * math::kMaxClusters];
  bk::load_coefficients(t, S, K, coef_f, coef_d, threadIdx.x, blockDim.x);
  __syncthreads();
  bk::blend_block<kReread, S_, K_>(t, blockIdx.x, S, K, coef_f, coef_d, threadIdx.x, blockDim.x);
}

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
  // Strided sources are made contiguous (stream-ordered copies that live until the kernel ran); the table is
  // filled in pinned memory and copied to the device on the stream.
  const kernels::BlendLaunch launch = kernels::prepare_blend_launch(sources, coefficients, out, /*pinned=*/true);
  const std::vector<bk::ChunkEntry>& chunks = launch.chunks;
  if (chunks.empty()) return;
  const bk::TableLayout& layout = launch.layout;
  at::Tensor dev = at::empty({layout.bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(launch.host_table, /*non_blocking=*/true);
  const bk::BlendTable t = bk::table_view(dev.const_data_ptr<uint8_t>(), layout);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(chunks.size()));
  const int s = static_cast<int>(S), k = static_cast<int>(K);
  // In place (an output overlaps a source): all sources in registers before any output is written.
  bk::with_kernel(bk::choose_kernel(S, K, outputs_overlap_sources), [&](auto reread, auto s_, auto k_) {
    blend_kernel<decltype(reread)::value, decltype(s_)::value, decltype(k_)::value>
        <<<grid, bk::kThreads, 0, stream>>>(t, s, k);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // `dev` and the contiguous copies are freed to the caching allocator after this point; their
  // reuse is ordered after the kernel on this stream.
}

}  // namespace dawin_ext

TORCH_LIBRARY_IMPL(dawin_ext, CUDA, m) { m.impl("blend_", &dawin_ext::blend_cuda); }
