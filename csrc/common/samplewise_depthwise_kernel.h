// Arithmetic of samplewise_depthwise_conv2d shared by the CPU kernel (cpu/cpu_kernels_impl.h), the CUDA
// kernels (cuda/samplewise_depthwise_cuda.cu) and the CPU grid emulation of the latter (cpu/cuda_emulation.cpp).
//
// A depthwise 2-D convolution (groups = channels) whose weights are mixed per sample:
//   mixed[b, t, c] = sum_s coef[b, s] * w[s, c, 0, kh, kw]            (t = kh * KW + kw; t = KH * KW: the bias)
//   out[b, c, oh, ow] = mixed[b, T, c] + sum_{kh, kw} x[b, c, ih, iw] * mixed[b, kh * KW + kw, c]
// with ih = oh * sh - ph + kh * dh, iw = ow * sw - pw + kw * dw, and taps outside the input skipped (zero padding).
// Everything accumulates in fp32 with one fmaf per term: the mix over s ascending, the output from the bias, then
// the taps in (kh, kw) row-major order. The CPU kernel's vector lanes (one channel each) and the CUDA threads (one
// output each) therefore add the same terms in the same order. x and out are channels-last: element (b, c, h, w)
// at ((b * H + h) * W + w) * C + c.
#pragma once

#include <cstdint>

#include "hd.h"
#include "simt.h"

namespace dawin_ext {
namespace kernels {
namespace depthwise {

constexpr int kThreads = 256;

struct Geometry {
  int64_t B, C, H, W;  // input [B, C, H, W]
  int64_t KH, KW;      // kernel
  int64_t OH, OW;      // output spatial size
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t S;  // sources
  DAWIN_HD int64_t taps() const { return KH * KW; }
};

// Element strides of the weights [S, C, 1, KH, KW] and of the biases [S, C] (unused without biases).
struct SourceStrides {
  int64_t s, c, kh, kw;
  int64_t bias_s, bias_c;
};

// The taps [k0, k1) of a K-tap kernel row whose input position o * s - p + k * d lies in [0, size).
DAWIN_HD void tap_range(int64_t o, int64_t s, int64_t p, int64_t d, int64_t K, int64_t size, int64_t& k0, int64_t& k1) {
  const int64_t start = o * s - p;  // input position of tap 0
  k0 = start >= 0 ? 0 : (-start + d - 1) / d;
  const int64_t room = size - start;  // tap k is inside while k * d < room
  k1 = room <= 0 ? 0 : (room + d - 1) / d;
  if (k1 > K) k1 = K;
  if (k0 > k1) k0 = k1;
}

// One entry of the mixed table [B, T + 1, C]: tap t < T of channel c, or (t == T) the mixed bias (0 without
// biases); w and biases are read through their strides, so any layout works.
template <typename scalar_t>
DAWIN_HD float mixed_entry(const scalar_t* w, const scalar_t* biases, const SourceStrides& st, const float* coef_b,
                           const Geometry& g, int64_t t, int64_t c) {
  float acc = 0.f;
  if (t == g.taps()) {
    if (biases == nullptr) return 0.f;
    for (int64_t s = 0; s < g.S; ++s) {
      acc = fmaf(coef_b[s], simt::to_float(biases[s * st.bias_s + c * st.bias_c]), acc);
    }
    return acc;
  }
  const int64_t kh = t / g.KW, kw = t - kh * g.KW;
  const scalar_t* wc = w + c * st.c + kh * st.kh + kw * st.kw;
  for (int64_t s = 0; s < g.S; ++s) acc = fmaf(coef_b[s], simt::to_float(wc[s * st.s]), acc);
  return acc;
}

// Table entry idx of the [B, T + 1, C] mixed table (one CUDA thread each; the CPU fills it the same way).
template <typename scalar_t>
DAWIN_HD float mixed_table_entry(const scalar_t* w, const scalar_t* biases, const SourceStrides& st, const float* coef,
                                 const Geometry& g, int64_t idx) {
  const int64_t per_sample = (g.taps() + 1) * g.C;
  const int64_t b = idx / per_sample;
  const int64_t rem = idx - b * per_sample;
  const int64_t t = rem / g.C;
  return mixed_entry(w, biases, st, coef + b * g.S, g, t, rem - t * g.C);
}

// Output element (b, c, oh, ow) from a channels-last x and the mixed table of sample b ([T + 1, C]).
template <typename scalar_t>
DAWIN_HD float output_point(const scalar_t* x, const float* mixed_b, const Geometry& g, int64_t b, int64_t oh,
                            int64_t ow, int64_t c) {
  int64_t h0, h1, w0, w1;
  tap_range(oh, g.sh, g.ph, g.dh, g.KH, g.H, h0, h1);
  tap_range(ow, g.sw, g.pw, g.dw, g.KW, g.W, w0, w1);
  float acc = mixed_b[g.taps() * g.C + c];
  for (int64_t kh = h0; kh < h1; ++kh) {
    const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
    for (int64_t kw = w0; kw < w1; ++kw) {
      const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
      acc = fmaf(simt::to_float(x[((b * g.H + ih) * g.W + iw) * g.C + c]), mixed_b[(kh * g.KW + kw) * g.C + c], acc);
    }
  }
  return acc;
}

// Output element idx of the channels-last output (c fastest, then ow, oh, b).
template <typename scalar_t>
DAWIN_HD float output_entry(const scalar_t* x, const float* mixed, const Geometry& g, int64_t idx) {
  const int64_t c = idx % g.C;
  int64_t p = idx / g.C;
  const int64_t ow = p % g.OW;
  p /= g.OW;
  const int64_t oh = p % g.OH;
  const int64_t b = p / g.OH;
  return output_point(x, mixed + b * (g.taps() + 1) * g.C, g, b, oh, ow, c);
}

}  // namespace depthwise
}  // namespace kernels
}  // namespace dawin_ext
