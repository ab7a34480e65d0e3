// Argument checks shared by the CPU and CUDA kernels, so both raise the same messages.
// Unsupported dtypes raise TypeError in Python (TORCH_CHECK_TYPE), every other bad argument ValueError
// (TORCH_CHECK_VALUE), matching the Python-side checks; see docs/errors.md.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/blend_math.h"
#include "ops.h"

namespace dawin_ext {

namespace {
bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }
}  // namespace

void check_softmax_entropy_args(const at::Tensor& logits, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() >= 1,
                    "softmax_entropy: logits must have at least one dimension (the classes), got a 0-d tensor");
  TORCH_CHECK_TYPE(is_supported_float(logits.scalar_type()),
                   "softmax_entropy: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "softmax_entropy: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(logits.size(-1) >= 1, "softmax_entropy: the class dimension (last) must not be empty, got shape ",
                    logits.sizes());
}

void check_entropy_coefficients_args(const at::Tensor& logits, c10::ArrayRef<double> temperatures,
                                     bool offset_adjustment) {
  TORCH_CHECK_VALUE(logits.dim() == 3,
                    "entropy_coefficients: logits must be [M models, B samples, C classes], got shape ",
                    logits.sizes());
  TORCH_CHECK_TYPE(is_supported_float(logits.scalar_type()),
                   "entropy_coefficients: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(0) >= 1, "entropy_coefficients: need at least one model, got M = 0");
  TORCH_CHECK_VALUE(logits.size(2) >= 1, "entropy_coefficients: the class dimension must not be empty, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(temperatures.empty() || static_cast<int64_t>(temperatures.size()) == logits.size(0),
                    "entropy_coefficients: got ", temperatures.size(), " temperatures for ", logits.size(0), " models");
  for (size_t m = 0; m < temperatures.size(); ++m) {
    TORCH_CHECK_VALUE(std::isfinite(temperatures[m]) && temperatures[m] > 0.0,
                      "entropy_coefficients: temperature of model ", m, " must be a finite number > 0, got ",
                      temperatures[m]);
  }
  TORCH_CHECK_VALUE(
      !offset_adjustment || logits.size(0) == 2,
      "entropy_coefficients: offset_adjustment is defined for exactly 2 models (zero-shot, fine-tuned), got M = ",
      logits.size(0));
  TORCH_CHECK_VALUE(
      !offset_adjustment || logits.size(1) >= 2,
      "entropy_coefficients: offset_adjustment needs the entropies' standard deviation over the batch, so at "
      "least 2 samples, got B = ",
      logits.size(1));
}

void check_blend_args(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out) {
  TORCH_CHECK_VALUE(coefficients.dim() == 2, "blend: coefficients must be [K clusters, S sources], got shape ",
                    coefficients.sizes());
  TORCH_CHECK_TYPE(coefficients.is_floating_point(), "blend: coefficients must be floating point, got ",
                   coefficients.scalar_type());
  const int64_t K = coefficients.size(0);
  const int64_t S = coefficients.size(1);
  TORCH_CHECK_VALUE(S >= 1 && S <= math::kMaxSources, "blend: the number of sources must be in [1, ", math::kMaxSources,
                    "], got ", S);
  TORCH_CHECK_VALUE(K >= 1 && K <= math::kMaxClusters, "blend: the number of clusters must be in [1, ",
                    math::kMaxClusters, "], got ", K);
  TORCH_CHECK_VALUE(static_cast<int64_t>(sources.size()) % S == 0, "blend: got ", sources.size(),
                    " source tensors, not a multiple of S = ", S);
  const int64_t N = static_cast<int64_t>(sources.size()) / S;
  TORCH_CHECK_VALUE(static_cast<int64_t>(out.size()) == K * N, "blend: expected K * N = ", K * N,
                    " output tensors, got ", out.size());
  for (int64_t n = 0; n < N; ++n) {
    const at::Tensor& ref = sources[n];
    TORCH_CHECK_VALUE(ref.device() == sources[0].device(), "blend: tensor ", n, " of source 0 is on ", ref.device(),
                      " but tensor 0 is on ", sources[0].device(), "; all tensors must be on one device");
    TORCH_CHECK_TYPE(is_supported_float(ref.scalar_type()) || ref.scalar_type() == at::kDouble, "blend: tensor ", n,
                     " must be float32, float64, float16 or bfloat16, got ", ref.scalar_type());
    for (int64_t s = 1; s < S; ++s) {
      const at::Tensor& t = sources[s * N + n];
      TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "blend: tensor ", n, " of source ", s, " has shape ", t.sizes(),
                        " but source 0 has ", ref.sizes());
      TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), "blend: tensor ", n, " of source ", s, " has dtype ",
                        t.scalar_type(), " but source 0 has ", ref.scalar_type());
      TORCH_CHECK_VALUE(t.device() == ref.device(), "blend: tensor ", n, " of source ", s, " is on ", t.device(),
                        " but source 0 is on ", ref.device());
    }
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor& o = out[k * N + n];
      TORCH_CHECK_VALUE(o.sizes() == ref.sizes(), "blend: output tensor ", n, " of cluster ", k, " has shape ",
                        o.sizes(), " but the sources have ", ref.sizes());
      TORCH_CHECK_VALUE(o.scalar_type() == ref.scalar_type(), "blend: output tensor ", n, " of cluster ", k,
                        " has dtype ", o.scalar_type(), " but the sources have ", ref.scalar_type());
      TORCH_CHECK_VALUE(o.device() == ref.device(), "blend: output tensor ", n, " of cluster ", k, " is on ",
                        o.device(), " but the sources are on ", ref.device());
      TORCH_CHECK_VALUE(o.is_contiguous(), "blend: output tensor ", n, " of cluster ", k, " must be contiguous");
    }
  }
}

namespace {
struct Span {
  int dev_type;
  int64_t dev_index;
  uintptr_t begin;
  uintptr_t end;  // one past the last byte
  int64_t index;
};
}  // namespace

std::vector<MemoryOverlap> memory_overlaps(at::TensorList tensors, int64_t num_read_only) {
  std::vector<Span> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (!t.defined() || !t.has_storage() || t.numel() == 0) continue;
    const auto* p = static_cast<const char*>(t.const_data_ptr());
    if (p == nullptr) continue;  // meta and similar: no memory to share
    // Lowest and highest element offsets reachable through the strides (negative strides included).
    int64_t lo = 0, hi = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t extent = (t.size(d) - 1) * t.stride(d);
      (extent < 0 ? lo : hi) += extent;
    }
    const int64_t el = static_cast<int64_t>(t.element_size());
    spans.push_back({static_cast<int>(t.device().type()), t.device().index(), reinterpret_cast<uintptr_t>(p + lo * el),
                     reinterpret_cast<uintptr_t>(p + (hi + 1) * el), static_cast<int64_t>(i)});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    if (a.dev_type != b.dev_type) return a.dev_type < b.dev_type;
    if (a.dev_index != b.dev_index) return a.dev_index < b.dev_index;
    return a.begin < b.begin;
  });
  std::vector<MemoryOverlap> found;
  for (size_t i = 0; i < spans.size(); ++i) {
    // Every span that starts inside span i (sorted by start) intersects it; that finds each pair once.
    for (size_t j = i + 1; j < spans.size(); ++j) {
      const Span& a = spans[i];
      const Span& b = spans[j];
      if (b.dev_type != a.dev_type || b.dev_index != a.dev_index || b.begin >= a.end) break;
      const int64_t first = std::min(a.index, b.index);
      const int64_t second = std::max(a.index, b.index);
      if (second < num_read_only) continue;  // two read-only tensors may share memory freely
      const at::Tensor& x = tensors[first];
      const at::Tensor& y = tensors[second];
      const bool exact = x.const_data_ptr() == y.const_data_ptr() && x.scalar_type() == y.scalar_type() &&
                         x.sizes() == y.sizes() && x.strides() == y.strides();
      found.push_back({first, second, exact});
    }
  }
  return found;
}

bool check_blend_aliasing(at::TensorList sources, const at::Tensor& coefficients, at::TensorList out) {
  const int64_t S = coefficients.size(1);
  const int64_t N = static_cast<int64_t>(sources.size()) / S;
  std::vector<at::Tensor> all(sources.begin(), sources.end());
  all.insert(all.end(), out.begin(), out.end());
  bool in_place = false;
  for (const MemoryOverlap& o : memory_overlaps(all, S * N)) {
    const int64_t k = (o.second - S * N) / N;  // the second of a pair is always an output
    const int64_t n = (o.second - S * N) % N;
    if (o.first < S * N) {
      const int64_t s = o.first / N;
      const int64_t m = o.first % N;
      if (o.exact && m == n) {
        in_place = true;
        continue;
      }
      TORCH_CHECK_VALUE(false, "blend: output tensor ", n, " of cluster ", k,
                        o.exact ? " is the same memory as" : " overlaps", " tensor ", m, " of source ", s,
                        "; an output may share memory with a source only by being exactly the source tensor of its "
                        "own index (an in-place blend). Partial overlaps and other views would be read after they "
                        "were written");
    }
    const int64_t k0 = (o.first - S * N) / N;
    const int64_t n0 = (o.first - S * N) % N;
    TORCH_CHECK_VALUE(false, "blend: output tensor ", n0, " of cluster ", k0, " and output tensor ", n, " of cluster ",
                      k, o.exact ? " are the same memory" : " overlap",
                      "; every output needs its own memory (dawin_ext.blend writes tied state-dict keys once)");
  }
  return in_place;
}

void check_sample_combine_args(const at::Tensor& stacked, const at::Tensor& weights) {
  TORCH_CHECK_VALUE(stacked.dim() == 4, "sample_combine: stacked must be [B, M, S, N], got shape ", stacked.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 2, "sample_combine: weights must be [B, S], got shape ", weights.sizes());
  TORCH_CHECK_TYPE(is_supported_float(stacked.scalar_type()),
                   "sample_combine: stacked must be float32, float16 or bfloat16, got ", stacked.scalar_type());
  TORCH_CHECK_TYPE(weights.is_floating_point(), "sample_combine: weights must be floating point, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.size(0) == stacked.size(0) && weights.size(1) == stacked.size(2),
                    "sample_combine: weights shape ", weights.sizes(), " does not match [B, S] = [", stacked.size(0),
                    ", ", stacked.size(2), "] of stacked ", stacked.sizes());
  TORCH_CHECK_VALUE(weights.device() == stacked.device(), "sample_combine: weights are on ", weights.device(),
                    " but stacked is on ", stacked.device());
}

void check_samplewise_linear_args(const at::Tensor& input, const at::Tensor& weights,
                                  const std::optional<at::Tensor>& biases, const at::Tensor& coefficients) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "samplewise_linear: input must be [B, ..., in_features], got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 3,
                    "samplewise_linear: weights must be [S sources, out_features, in_features], got shape ",
                    weights.sizes());
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()),
                   "samplewise_linear: input must be float32, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK_TYPE(weights.scalar_type() == input.scalar_type(), "samplewise_linear: weights are ",
                   weights.scalar_type(), " but input is ", input.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(weights.size(0) >= 1 && weights.size(0) <= math::kMaxSources, "samplewise_linear: need 1 to ",
                    math::kMaxSources, " weight sources, got ", weights.size(0));
  TORCH_CHECK_VALUE(weights.size(2) == input.size(-1), "samplewise_linear: weights have in_features ", weights.size(2),
                    " but input's last dim is ", input.size(-1), " (input shape ", input.sizes(), ")");
  TORCH_CHECK_VALUE(
      coefficients.dim() == 2 && coefficients.size(0) == input.size(0) && coefficients.size(1) == weights.size(0),
      "samplewise_linear: coefficients must be [B, S] = [", input.size(0), ", ", weights.size(0), "], got shape ",
      coefficients.sizes());
  TORCH_CHECK_TYPE(coefficients.is_floating_point(), "samplewise_linear: coefficients must be floating point, got ",
                   coefficients.scalar_type());
  TORCH_CHECK_VALUE(weights.device() == input.device(), "samplewise_linear: weights are on ", weights.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(coefficients.device() == input.device(), "samplewise_linear: coefficients are on ",
                    coefficients.device(), " but input is on ", input.device());
  if (biases) {
    TORCH_CHECK_VALUE(biases->dim() == 2 && biases->size(0) == weights.size(0) && biases->size(1) == weights.size(1),
                      "samplewise_linear: biases must be [S, out_features] = [", weights.size(0), ", ", weights.size(1),
                      "], got shape ", biases->sizes());
    TORCH_CHECK_TYPE(biases->scalar_type() == input.scalar_type(), "samplewise_linear: biases are ",
                     biases->scalar_type(), " but input is ", input.scalar_type(), "; they must match");
    TORCH_CHECK_VALUE(biases->device() == input.device(), "samplewise_linear: biases are on ", biases->device(),
                      " but input is on ", input.device());
  }
}

kernels::depthwise::Geometry check_samplewise_depthwise_args(const at::Tensor& input, const at::Tensor& weights,
                                                             const std::optional<at::Tensor>& biases,
                                                             const at::Tensor& coefficients, c10::IntArrayRef stride,
                                                             c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const char* op = "samplewise_depthwise_conv2d";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be [B, C, H, W], got shape ", input.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 5 && weights.size(2) == 1, op,
                    ": weights must be [S sources, C, 1, KH, KW] (S depthwise weights), got shape ", weights.sizes());
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), op, ": input must be float32, float16 or bfloat16, got ",
                   input.scalar_type());
  TORCH_CHECK_TYPE(weights.scalar_type() == input.scalar_type(), op, ": weights are ", weights.scalar_type(),
                   " but input is ", input.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(weights.size(0) >= 1 && weights.size(0) <= math::kMaxSources, op, ": need 1 to ", math::kMaxSources,
                    " weight sources, got ", weights.size(0));
  TORCH_CHECK_VALUE(weights.size(1) == input.size(1), op, ": weights have ", weights.size(1),
                    " channels but input has ", input.size(1), " (input shape ", input.sizes(), ")");
  TORCH_CHECK_VALUE(weights.size(3) >= 1 && weights.size(4) >= 1, op, ": the kernel must not be empty, got weights ",
                    weights.sizes());
  TORCH_CHECK_VALUE(
      coefficients.dim() == 2 && coefficients.size(0) == input.size(0) && coefficients.size(1) == weights.size(0), op,
      ": coefficients must be [B, S] = [", input.size(0), ", ", weights.size(0), "], got shape ", coefficients.sizes());
  TORCH_CHECK_TYPE(coefficients.is_floating_point(), op, ": coefficients must be floating point, got ",
                   coefficients.scalar_type());
  TORCH_CHECK_VALUE(weights.device() == input.device(), op, ": weights are on ", weights.device(), " but input is on ",
                    input.device());
  TORCH_CHECK_VALUE(coefficients.device() == input.device(), op, ": coefficients are on ", coefficients.device(),
                    " but input is on ", input.device());
  if (biases) {
    TORCH_CHECK_VALUE(biases->dim() == 2 && biases->size(0) == weights.size(0) && biases->size(1) == weights.size(1),
                      op, ": biases must be [S, C] = [", weights.size(0), ", ", weights.size(1), "], got shape ",
                      biases->sizes());
    TORCH_CHECK_TYPE(biases->scalar_type() == input.scalar_type(), op, ": biases are ", biases->scalar_type(),
                     " but input is ", input.scalar_type(), "; they must match");
    TORCH_CHECK_VALUE(biases->device() == input.device(), op, ": biases are on ", biases->device(), " but input is on ",
                      input.device());
  }
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": stride, padding and dilation must have 2 entries each, got ", stride, ", ", padding, ", ",
                    dilation);
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  kernels::depthwise::Geometry g{};
  g.B = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.KH = weights.size(3);
  g.KW = weights.size(4);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.S = weights.size(0);
  const int64_t span_h = g.dh * (g.KH - 1) + 1, span_w = g.dw * (g.KW - 1) + 1;
  TORCH_CHECK_VALUE(g.H + 2 * g.ph >= span_h && g.W + 2 * g.pw >= span_w, op, ": the padded input (", g.H + 2 * g.ph,
                    " x ", g.W + 2 * g.pw, ") is smaller than the dilated kernel (", span_h, " x ", span_w,
                    "); input shape ", input.sizes(), ", weights ", weights.sizes());
  g.OH = (g.H + 2 * g.ph - span_h) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - span_w) / g.sw + 1;
  return g;
}

}  // namespace dawin_ext
