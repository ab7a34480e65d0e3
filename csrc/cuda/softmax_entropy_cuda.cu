// CUDA softmax_entropy and entropy_coefficients: the __global__ wrappers and their launch. The
// per-thread work (which elements a thread owns, head / vector / tail, the accumulation) and the
// choice between the warp-per-row and block-per-row kernels are in common/softmax_entropy_kernel.h,
// which the CPU grid emulator (cpu/cuda_emulation.cpp) runs too.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../common/softmax_entropy_kernel.h"
#include "../ops.h"
#include "cuda_utils.cuh"

namespace dawin_ext {

int cuda_runtime_version() { return CUDART_VERSION; }

namespace {

namespace ek = kernels::entropy;

template <typename scalar_t>
__global__ void __launch_bounds__(ek::kWarpRowThreads)
    entropy_warp_rows_kernel(const scalar_t* __restrict__ x, int64_t R, int64_t C, int64_t rs, int64_t cs, float scale,
                             float* __restrict__ out) {
  const int lane = threadIdx.x % simt::kWarp;
  const int warps = blockDim.x / simt::kWarp;
  for (int64_t r = ek::warp_rows_first(blockIdx.x, threadIdx.x / simt::kWarp, warps); r < R;
       r += ek::warp_rows_step(gridDim.x, warps)) {
    math::EntropyState st = ek::row_state(x + r * rs, C, cs, scale, lane, simt::kWarp);
    st = simt::warp_merge(st);
    if (lane == 0) out[r] = math::entropy_state_finalize(st);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(ek::kBlockRowThreads)
    entropy_block_rows_kernel(const scalar_t* __restrict__ x, int64_t R, int64_t C, int64_t rs, int64_t cs, float scale,
                              float* __restrict__ out) {
  __shared__ float scratch[3 * simt::kWarp];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    math::EntropyState st = ek::row_state(x + r * rs, C, cs, scale, threadIdx.x, blockDim.x);
    st = cuda::block_merge(st, scratch);
    if (threadIdx.x == 0) out[r] = math::entropy_state_finalize(st);
  }
}

// Entropy of each row of the strided [R, C] view x2d into out[0, R) on the current stream.
void launch_entropy_rows(const at::Tensor& x2d, float scale, float* out) {
  const int64_t R = x2d.size(0), C = x2d.size(1), rs = x2d.stride(0), cs = x2d.stride(1);
  if (R == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ek::LaunchConfig cfg = ek::launch_config(R, C, cuda::current_sms());
  simt::dispatch_float_types(x2d.scalar_type(), "softmax_entropy_cuda", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
    if (cfg.warp_rows) {
      entropy_warp_rows_kernel<scalar_t><<<cfg.grid, cfg.threads, 0, stream>>>(xp, R, C, rs, cs, scale, out);
    } else {
      entropy_block_rows_kernel<scalar_t><<<cfg.grid, cfg.threads, 0, stream>>>(xp, R, C, rs, cs, scale, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_cuda_input(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": expected a CUDA tensor, got one on ", t.device());
}

}  // namespace

at::Tensor softmax_entropy_cuda(const at::Tensor& logits, double temperature) {
  check_softmax_entropy_args(logits, temperature);
  check_cuda_input(logits, "softmax_entropy");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t C = logits.size(-1);
  auto out_sizes = logits.sizes().vec();
  out_sizes.pop_back();
  at::Tensor out = at::empty(out_sizes, logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const at::Tensor x2d = logits.reshape({-1, C});  // a strided view where possible
  launch_entropy_rows(x2d, static_cast<float>(1.0 / temperature), out.data_ptr<float>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> entropy_coefficients_cuda(const at::Tensor& logits,
                                                             c10::ArrayRef<double> temperatures,
                                                             bool offset_adjustment) {
  check_entropy_coefficients_args(logits, temperatures, offset_adjustment);
  check_cuda_input(logits, "entropy_coefficients");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t M = logits.size(0), B = logits.size(1), C = logits.size(2);
  at::Tensor entropies = at::empty({M, B}, logits.options().dtype(at::kFloat));
  if (B > 0) {
    const at::Tensor x2d = logits.reshape({M * B, C});
    float* out = entropies.data_ptr<float>();
    // One launch per model (M is small): each has its own temperature.
    for (int64_t m = 0; m < M; ++m) {
      const float scale = temperatures.empty() ? 1.f : static_cast<float>(1.0 / temperatures[m]);
      launch_entropy_rows(x2d.narrow(0, m * B, B), scale, out + m * B);
    }
  }
  return {coefficients_from_entropies(entropies, offset_adjustment), entropies};
}

}  // namespace dawin_ext

TORCH_LIBRARY_IMPL(dawin_ext, CUDA, m) {
  m.impl("softmax_entropy", &dawin_ext::softmax_entropy_cuda);
  m.impl("entropy_coefficients", &dawin_ext::entropy_coefficients_cuda);
}
