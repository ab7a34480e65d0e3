// Host-side preparation shared by the CUDA launchers and the CPU emulation of their grids, so that the
// emulation exercises the same table, chunking and partial-GEMM set-up the GPU path uses.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "blend_kernel.h"
#include "samplewise_depthwise_kernel.h"

namespace dawin_ext {
namespace kernels {

// blend_'s launch inputs: contiguous sources (kept alive until the kernel ran), the chunks of the one grid, and
// the pointer/coefficient table filled in host memory (pinned for an asynchronous copy to the device, or not).
struct BlendLaunch {
  std::vector<at::Tensor> src_c;
  std::vector<blend::ChunkEntry> chunks;
  blend::TableLayout layout{};
  at::Tensor host_table;
};

inline BlendLaunch prepare_blend_launch(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out,
                                        bool pinned) {
  namespace bk = blend;
  const int64_t K = coefficients.size(0), S = coefficients.size(1);
  const int64_t N = static_cast<int64_t>(sources.size()) / S;
  BlendLaunch L;
  const at::Tensor coef = coefficients.detach().to(at::kCPU, at::kDouble).contiguous();
  L.src_c.resize(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) L.src_c[i] = sources[i].contiguous();
  std::vector<int64_t> numel(N);
  std::vector<int32_t> dtypes(N);
  for (int64_t n = 0; n < N; ++n) {
    numel[n] = L.src_c[n].numel();
    dtypes[n] = bk::dtype_code(L.src_c[n].scalar_type());
  }
  L.chunks = bk::make_chunks(numel);
  if (L.chunks.empty()) return L;
  TORCH_CHECK(L.chunks.size() < (size_t{1} << 31), "blend: too many chunks for one launch (", L.chunks.size(), ")");
  std::vector<const void*> src_ptrs(L.src_c.size());
  for (size_t i = 0; i < L.src_c.size(); ++i) src_ptrs[i] = L.src_c[i].const_data_ptr();
  std::vector<void*> dst_ptrs(out.size());
  for (size_t i = 0; i < out.size(); ++i) dst_ptrs[i] = out[i].data_ptr();
  L.layout = bk::table_layout(N, S, K, static_cast<int64_t>(L.chunks.size()));
  L.host_table =
      at::empty({L.layout.bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU).pinned_memory(pinned));
  bk::fill_table(L.host_table.data_ptr<uint8_t>(), L.layout, N, S, K, coef.const_data_ptr<double>(), src_ptrs, dst_ptrs,
                 numel, dtypes, L.chunks);
  return L;
}

// samplewise_linear's S partial GEMMs ([S, rows, OUT], one per source) and what the blend kernel reads with them.
struct LinearPartials {
  at::Tensor out, partial, coefficients, bias;
  int64_t rows = 0, per_sample = 0, num_sources = 0, out_features = 0;
};

inline LinearPartials samplewise_linear_partials(const at::Tensor& input, const at::Tensor& weights,
                                                 const std::optional<at::Tensor>& biases,
                                                 const at::Tensor& coefficients) {
  LinearPartials P;
  const int64_t B = input.size(0), IN = input.size(-1), S = weights.size(0), OUT = weights.size(1);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = OUT;
  P.out = at::empty(shape, input.options());
  P.num_sources = S;
  P.out_features = OUT;
  if (P.out.numel() == 0) return P;
  P.rows = P.out.numel() / OUT;
  P.per_sample = P.rows / B;
  const at::Tensor x = input.reshape({P.rows, IN});
  P.partial = at::empty({S, P.rows, OUT}, input.options());
  for (int64_t s = 0; s < S; ++s) {
    at::Tensor slot = P.partial[s];
    at::mm_out(slot, x, weights[s].t());
  }
  P.coefficients = coefficients.to(at::kFloat).contiguous();
  P.bias = biases ? biases->contiguous() : at::Tensor();
  return P;
}

// samplewise_lora's output: [..., OUT] for an input [B, ..., IN], with its row count (all leading dims) and rows
// per sample. Shared by the CPU and CUDA entry points.
struct LoraShape {
  std::vector<int64_t> out_shape;
  int64_t rows = 0, per_sample = 0;
};

inline LoraShape samplewise_lora_shape(const at::Tensor& input, int64_t out_features) {
  LoraShape L;
  L.out_shape.assign(input.sizes().begin(), input.sizes().end() - 1);
  L.out_shape.push_back(out_features);
  L.rows = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  L.per_sample = input.size(0) > 0 ? L.rows / input.size(0) : 0;
  return L;
}

// samplewise_depthwise_conv2d's output: [B, C, OH, OW] channels-last in input's dtype (every path writes element
// (b, c, oh, ow) at ((b * OH + oh) * OW + ow) * C + c).
inline at::Tensor depthwise_output(const at::Tensor& input, const depthwise::Geometry& g) {
  return at::empty({g.B, g.C, g.OH, g.OW}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// samplewise_depthwise_conv2d's weight and bias strides (elements), read by the mixed table's entries.
inline depthwise::SourceStrides depthwise_source_strides(const at::Tensor& weights,
                                                         const std::optional<at::Tensor>& biases) {
  depthwise::SourceStrides st{};
  st.s = weights.stride(0);
  st.c = weights.stride(1);
  st.kh = weights.stride(3);
  st.kw = weights.stride(4);
  st.bias_s = biases ? biases->stride(0) : 0;
  st.bias_c = biases ? biases->stride(1) : 0;
  return st;
}

}  // namespace kernels
}  // namespace dawin_ext
