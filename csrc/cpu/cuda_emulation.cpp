// CPU grid emulator of the CUDA kernels, for tests only (tests/ops/test_cuda_emulation.py).
//
// No GPU has run this project's CUDA kernels. Their per-thread work (which elements a thread owns,
// the vector / scalar choice, head and tail, the accumulation) lives in common/*_kernel.h as
// __host__ __device__ functions that the __global__ wrappers in cuda/*.cu call. This file calls
// the same functions for every thread of the same grid (same launch configuration, same kernel
// choice), one block and one thread after another, over host memory; the warp and block merges go
// through simt.h's interface with arrays in place of shuffles, in the GPU's butterfly order. Under
// AddressSanitizer (scripts/asan_check.sh) every index a thread computes is bounds-checked, and
// UBSan checks the alignment of every vector access.
//
// What it cannot cover: real shuffles and shared-memory races (threads run one after another, and
// each barrier-separated step runs for all threads before the next), cuBLAS (samplewise_linear's
// GEMMs run as CPU at::mm here), streams, graphs, pinned-memory copies, and the device's math
// library (expf / logf differ from the host's by an ulp or two).
//
// The ops are private (leading underscore; declared in ops.h, registered in registration.cpp) and take
// CPU tensors:
//   _emulate_softmax_entropy_cuda(logits, temperature, num_sms) -> (entropies, kernel)
//   _emulate_blend_cuda(sources, coefficients, out, outputs_overlap_sources, kernel) -> kernel
//   _emulate_sample_combine_cuda(stacked, weights, num_sms) -> (out, kernel)
//   _emulate_samplewise_linear_cuda(input, weights, biases, coefficients, num_sms) -> out
//   _emulate_samplewise_depthwise_conv2d_cuda(input, weights, biases, coefficients, stride, padding, dilation,
//                                             num_sms) -> out
// num_sms stands for the device's multiprocessor count, which sizes the grids (simt::grid_size):
// a small count makes every thread walk its grid-stride loop several times. `kernel` names the
// specialisation that ran (or, for blend, may force one).
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/blend_kernel.h"
#include "../common/kernel_host.h"
#include "../common/sample_combine_kernel.h"
#include "../common/samplewise_depthwise_kernel.h"
#include "../common/samplewise_linear_kernel.h"
#include "../common/simt.h"
#include "../common/softmax_entropy_kernel.h"
#include "../ops.h"

namespace dawin_ext {
namespace emulation {
namespace {

namespace ek = kernels::entropy;
namespace bk = kernels::blend;
namespace sck = kernels::sample_combine;
namespace slk = kernels::samplewise_linear;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

void check_cpu(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": the emulator takes CPU tensors, got ", what, " on ", t.device());
}

void check_sms(int64_t sms, const char* op) {
  TORCH_CHECK_VALUE(sms >= 1 && sms <= 4096, op, ": num_sms must be in [1, 4096], got ", sms);
}

// A grid-stride kernel (the launchers' grid: simt::grid_size(total, threads, num_sms, 8) blocks of `threads`) over
// `total` items, thread after thread: item(i) for every index each thread visits, in the threads' order.
template <typename F>
void run_grid(int64_t total, int threads, int64_t num_sms, F&& item) {
  const int grid = simt::grid_size(total, threads, num_sms, 8);
  for (int64_t block = 0; block < grid; ++block) {
    for (int tid = 0; tid < threads; ++tid) {
      for (int64_t i = simt::grid_stride_first(block, threads, tid); i < total;
           i += simt::grid_stride_step(grid, threads)) {
        item(i);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// softmax_entropy: entropy_warp_rows_kernel and entropy_block_rows_kernel.
// ---------------------------------------------------------------------------------------------

// cuda::block_merge with its barriers as step boundaries: every warp's butterfly and publish, then
// warp 0's gather and butterfly. Returns thread 0's state.
math::EntropyState block_merge(const std::vector<math::EntropyState>& st) {
  const int threads = static_cast<int>(st.size());
  const int warps = threads / simt::kWarp;
  float scratch[3 * simt::kWarp];
  for (float& v : scratch) v = kNaN;  // shared memory starts as garbage
  for (int w = 0; w < warps; ++w) {
    simt::HostWarp<math::EntropyState> lanes;
    for (int l = 0; l < simt::kWarp; ++l) lanes.lane[l] = st[w * simt::kWarp + l];
    lanes = simt::warp_merge(lanes);
    for (int l = 0; l < simt::kWarp; ++l) simt::block_merge_publish(lanes.lane[l], l, w, scratch);
  }
  // __syncthreads()
  simt::HostWarp<math::EntropyState> warp0;
  for (int l = 0; l < simt::kWarp; ++l) warp0.lane[l] = simt::block_merge_gather(l, warps, scratch);
  warp0 = simt::warp_merge(warp0);
  return warp0.lane[0];
}

template <typename scalar_t>
void entropy_warp_rows(const scalar_t* x, int64_t R, int64_t C, int64_t rs, int64_t cs, float scale, float* out,
                       int grid, int threads) {
  const int warps = threads / simt::kWarp;
  for (int64_t block = 0; block < grid; ++block) {
    for (int warp = 0; warp < warps; ++warp) {
      for (int64_t r = ek::warp_rows_first(block, warp, warps); r < R; r += ek::warp_rows_step(grid, warps)) {
        simt::HostWarp<math::EntropyState> st;
        for (int lane = 0; lane < simt::kWarp; ++lane) {
          st.lane[lane] = ek::row_state(x + r * rs, C, cs, scale, lane, simt::kWarp);
        }
        st = simt::warp_merge(st);
        out[r] = math::entropy_state_finalize(st.lane[0]);  // lane 0 writes
      }
    }
  }
}

template <typename scalar_t>
void entropy_block_rows(const scalar_t* x, int64_t R, int64_t C, int64_t rs, int64_t cs, float scale, float* out,
                        int grid, int threads) {
  std::vector<math::EntropyState> st(threads);
  for (int64_t block = 0; block < grid; ++block) {
    for (int64_t r = block; r < R; r += grid) {
      for (int tid = 0; tid < threads; ++tid) st[tid] = ek::row_state(x + r * rs, C, cs, scale, tid, threads);
      out[r] = math::entropy_state_finalize(block_merge(st));  // thread 0 writes
    }
  }
}

}  // namespace

std::tuple<at::Tensor, std::string> emulate_softmax_entropy(const at::Tensor& logits, double temperature,
                                                            int64_t num_sms) {
  const char* op = "_emulate_softmax_entropy_cuda";
  check_softmax_entropy_args(logits, temperature);
  check_cpu(logits, op, "logits");
  check_sms(num_sms, op);
  // As softmax_entropy_cuda and its launch_entropy_rows.
  const int64_t C = logits.size(-1);
  auto out_sizes = logits.sizes().vec();
  out_sizes.pop_back();
  at::Tensor out = at::empty(out_sizes, logits.options().dtype(at::kFloat));
  const at::Tensor x2d = logits.reshape({-1, C});
  const int64_t R = x2d.size(0), rs = x2d.stride(0), cs = x2d.stride(1);
  const ek::LaunchConfig cfg = ek::launch_config(R, C, num_sms);
  const std::string kernel = cfg.warp_rows ? "warp_rows" : "block_rows";
  if (out.numel() == 0) return {out, kernel};
  const float scale = static_cast<float>(1.0 / temperature);
  simt::dispatch_float_types(x2d.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
    if (cfg.warp_rows) {
      entropy_warp_rows(xp, R, C, rs, cs, scale, out.data_ptr<float>(), cfg.grid, cfg.threads);
    } else {
      entropy_block_rows(xp, R, C, rs, cs, scale, out.data_ptr<float>(), cfg.grid, cfg.threads);
    }
  });
  return {out, kernel};
}

namespace {

// ---------------------------------------------------------------------------------------------
// blend: blend_kernel<kReread, S_, K_>.
// ---------------------------------------------------------------------------------------------

template <bool kReread, int S_, int K_>
void blend_grid(const bk::BlendTable& t, int64_t blocks, int S, int K) {
  for (int64_t block = 0; block < blocks; ++block) {
    float coef_f[math::kMaxSources * math::kMaxClusters];
    double coef_d[math::kMaxSources * math::kMaxClusters];
    std::fill(std::begin(coef_f), std::end(coef_f), kNaN);
    std::fill(std::begin(coef_d), std::end(coef_d), static_cast<double>(kNaN));
    for (int tid = 0; tid < bk::kThreads; ++tid) bk::load_coefficients(t, S, K, coef_f, coef_d, tid, bk::kThreads);
    // __syncthreads()
    for (int tid = 0; tid < bk::kThreads; ++tid) {
      bk::blend_block<kReread, S_, K_>(t, block, S, K, coef_f, coef_d, tid, bk::kThreads);
    }
  }
}

}  // namespace

std::string emulate_blend(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out,
                          bool outputs_overlap_sources, c10::string_view kernel) {
  const char* op = "_emulate_blend_cuda";
  check_blend_args(sources, coefficients, out);
  const int64_t K = coefficients.size(0);
  const int64_t S = coefficients.size(1);
  const int64_t N = static_cast<int64_t>(sources.size()) / S;
  bk::Kernel chosen = bk::choose_kernel(S, K, outputs_overlap_sources);
  if (kernel != "auto") {
    bool found = false;
    for (int i = 0; i < bk::kNumKernels && !found; ++i) {
      if (kernel == bk::kernel_name(static_cast<bk::Kernel>(i))) {
        chosen = static_cast<bk::Kernel>(i);
        found = true;
      }
    }
    TORCH_CHECK_VALUE(found, op, ": unknown kernel '", kernel, "'");
    // A forced re-read kernel may run with overlapping outputs (to show what it would compute);
    // a fixed-size kernel must match S and K, or its threads would index past the table.
    TORCH_CHECK_VALUE(chosen == bk::Kernel::kReread || bk::kernel_fits(chosen, S, K, outputs_overlap_sources), op,
                      ": kernel ", kernel, " cannot blend S=", S, " sources into K=", K, " outputs");
  }
  const std::string name = bk::kernel_name(chosen);
  if (N == 0) return name;
  for (const at::Tensor& t : sources) check_cpu(t, op, "a source");
  for (const at::Tensor& t : out) check_cpu(t, op, "an output");
  // blend_cuda's host side, with the table left in (unpinned) host memory instead of copied to the device.
  const kernels::BlendLaunch launch = kernels::prepare_blend_launch(sources, coefficients, out, /*pinned=*/false);
  const std::vector<bk::ChunkEntry>& chunks = launch.chunks;
  if (chunks.empty()) return name;
  const bk::BlendTable t = bk::table_view(launch.host_table.const_data_ptr<uint8_t>(), launch.layout);
  const int s = static_cast<int>(S), k = static_cast<int>(K);
  bk::with_kernel(chosen, [&](auto reread, auto s_, auto k_) {
    blend_grid<decltype(reread)::value, decltype(s_)::value, decltype(k_)::value>(
        t, static_cast<int64_t>(chunks.size()), s, k);
  });
  return name;
}

// ---------------------------------------------------------------------------------------------
// sample_combine: sample_combine_kernel<scalar_t, V>.
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, std::string> emulate_sample_combine(const at::Tensor& stacked, const at::Tensor& weights,
                                                           int64_t num_sms) {
  const char* op = "_emulate_sample_combine_cuda";
  check_sample_combine_args(stacked, weights);
  check_cpu(stacked, op, "stacked");
  check_cpu(weights, op, "weights");
  check_sms(num_sms, op);
  // As sample_combine_cuda.
  const int64_t B = stacked.size(0), M = stacked.size(1), S = stacked.size(2), N = stacked.size(3);
  const at::Tensor x = stacked.contiguous();
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, M, N}, stacked.options());
  std::string kernel;
  simt::dispatch_float_types(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int V = simt::VecWidth<scalar_t>::value;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const float* wp = w.const_data_ptr<float>();
    if (sck::use_vector_kernel(N, xp, outp)) {
      kernel = "vector";
      run_grid(B * M * (N / V), sck::kThreads, num_sms,
               [&](int64_t i) { sck::combine_group<scalar_t, V>(xp, wp, outp, M, S, N, i); });
    } else {
      kernel = "scalar";
      run_grid(B * M * N, sck::kThreads, num_sms,
               [&](int64_t i) { sck::combine_group<scalar_t, 1>(xp, wp, outp, M, S, N, i); });
    }
  });
  return {out, kernel};
}

// ---------------------------------------------------------------------------------------------
// samplewise_linear: blend_partials_kernel (the GEMMs, cuBLAS on the GPU, are CPU at::mm here).
// ---------------------------------------------------------------------------------------------

at::Tensor emulate_samplewise_linear(const at::Tensor& input, const at::Tensor& weights,
                                     const std::optional<at::Tensor>& biases, const at::Tensor& coefficients,
                                     int64_t num_sms) {
  const char* op = "_emulate_samplewise_linear_cuda";
  check_samplewise_linear_args(input, weights, biases, coefficients);
  check_cpu(input, op, "input");
  check_sms(num_sms, op);
  // samplewise_linear_cuda's host side (the partial GEMMs run with at::mm on the CPU instead of cuBLAS).
  const kernels::LinearPartials p = kernels::samplewise_linear_partials(input, weights, biases, coefficients);
  at::Tensor out = p.out;
  if (out.numel() == 0) return out;
  const int64_t rows = p.rows, M = p.per_sample, OUT = p.out_features, S = p.num_sources;
  const at::Tensor &partial = p.partial, &c = p.coefficients, &bias = p.bias;
  simt::dispatch_float_types(input.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* pp = partial.const_data_ptr<scalar_t>();
    const scalar_t* bp = biases ? bias.const_data_ptr<scalar_t>() : nullptr;
    const float* cp = c.const_data_ptr<float>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    run_grid(rows * OUT, slk::kThreads, num_sms,
             [&](int64_t i) { slk::blend_partials_element(pp, bp, cp, op_, rows, M, OUT, static_cast<int>(S), i); });
  });
  return out;
}

// samplewise_depthwise_conv2d: depthwise_mix_kernel, then depthwise_conv_kernel (samplewise_depthwise_cuda.cu).
at::Tensor emulate_samplewise_depthwise(const at::Tensor& input, const at::Tensor& weights,
                                        const std::optional<at::Tensor>& biases, const at::Tensor& coefficients,
                                        c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                        int64_t num_sms) {
  namespace dwk = kernels::depthwise;
  const char* op = "_emulate_samplewise_depthwise_conv2d_cuda";
  const dwk::Geometry g =
      check_samplewise_depthwise_args(input, weights, biases, coefficients, stride, padding, dilation);
  check_cpu(input, op, "input");
  check_sms(num_sms, op);
  // As samplewise_depthwise_conv2d_cuda.
  at::Tensor out = kernels::depthwise_output(input, g);
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor coef = coefficients.to(at::kFloat).contiguous();
  at::Tensor mixed = at::empty({g.B, g.taps() + 1, g.C}, input.options().dtype(at::kFloat));
  mixed.fill_(kNaN);  // device memory starts as garbage
  const dwk::SourceStrides st = kernels::depthwise_source_strides(weights, biases);
  simt::dispatch_float_types(input.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    const scalar_t* bp = biases ? biases->const_data_ptr<scalar_t>() : nullptr;
    const float* cp = coef.const_data_ptr<float>();
    float* mp = mixed.data_ptr<float>();
    run_grid(mixed.numel(), dwk::kThreads, num_sms,
             [&](int64_t i) { mp[i] = dwk::mixed_table_entry(w, bp, st, cp, g, i); });
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    run_grid(out.numel(), dwk::kThreads, num_sms,
             [&](int64_t i) { outp[i] = static_cast<scalar_t>(dwk::output_entry(xp, mp, g, i)); });
  });
  return out;
}

}  // namespace emulation
}  // namespace dawin_ext
