// Shared math for the fused softmax-entropy, used by the CPU and the CUDA kernels alike, so that the
// CPU tests check the exact arithmetic the GPU runs.
//
// For one row z (already divided by the temperature), the state after some elements is
//   m = max z,   s = sum exp(z - m),   t = sum exp(z - m) * (z - m).
// Then H = log s - t / s. Keeping t relative to m (rather than sum exp(z - m) * z) avoids the
// catastrophic cancellation that m - E_p[z] suffers for logits of magnitude 1e4 in fp32.
// When the max moves from m to m' every old term is rescaled by r = exp(m - m'):
//   s' = r * s,   t' = r * (t + (m - m') * s).
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DAWIN_HD __host__ __device__ __forceinline__
#else
#define DAWIN_HD inline
#endif

namespace dawin_ext {
namespace math {

struct EntropyState {
  float m;  // running max (-inf while every element seen so far is -inf)
  float s;  // sum of exp(z - m)
  float t;  // sum of exp(z - m) * (z - m)
};

DAWIN_HD EntropyState entropy_state_empty() { return EntropyState{-std::numeric_limits<float>::infinity(), 0.f, 0.f}; }

// exp(d) * d where d = z - m <= 0; d = -inf contributes nothing (0 * -inf would be NaN).
DAWIN_HD float weighted_term(float e, float d) { return e > 0.f ? e * d : 0.f; }

// Rescales a state to a new (larger or equal) max.
DAWIN_HD EntropyState entropy_state_rescale(const EntropyState& a, float new_m) {
  if (a.s == 0.f) {
    // Nothing seen yet, or only -inf: avoid (-inf) - (-inf).
    return EntropyState{new_m, 0.f, 0.f};
  }
  const float shift = a.m - new_m;  // <= 0
  const float r = expf(shift);
  return EntropyState{new_m, r * a.s, r * (a.t + shift * a.s)};
}

// Merges two partial states (online-softmax rescaling rule). Commutative up to rounding.
DAWIN_HD EntropyState entropy_state_merge(const EntropyState& a, const EntropyState& b) {
  // NaN in either max propagates through fmaxf only if both are NaN, so check explicitly.
  if (a.m != a.m || b.m != b.m) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    return EntropyState{nan, nan, nan};
  }
  const float m = a.m > b.m ? a.m : b.m;
  if (m == -std::numeric_limits<float>::infinity()) return entropy_state_empty();
  const EntropyState ra = entropy_state_rescale(a, m);
  const EntropyState rb = entropy_state_rescale(b, m);
  return EntropyState{m, ra.s + rb.s, ra.t + rb.t};
}

// Adds one element z to a state whose max is already >= z (the two-level scheme: a block's max is
// found first, then every element of the block is accumulated against it with one exp each).
DAWIN_HD void entropy_state_accumulate(EntropyState& st, float z) {
  const float d = z - st.m;
  const float e = expf(d);
  st.s += e;
  st.t += weighted_term(e, d);
}

// Adds one element with the online rule (max may move).
DAWIN_HD void entropy_state_push(EntropyState& st, float z) {
  if (z != z) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    st = EntropyState{nan, nan, nan};
    return;
  }
  if (z > st.m) st = entropy_state_rescale(st, z);
  if (st.m == -std::numeric_limits<float>::infinity()) return;  // z is -inf too
  entropy_state_accumulate(st, z);
}

// Entropy of the row. A row whose entries are all -inf has no softmax distribution (PyTorch's
// softmax gives NaN there too), so the result is NaN; a row holding +inf gives NaN as well.
DAWIN_HD float entropy_state_finalize(const EntropyState& st) {
  if (!(st.s > 0.f)) return std::numeric_limits<float>::quiet_NaN();
  if (st.m == std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::quiet_NaN();
  const float h = logf(st.s) - st.t / st.s;
  // Rounding can leave a one-hot row a hair below zero; entropy is never negative. Written so
  // that a NaN h stays NaN.
  return h < 0.f ? 0.f : h;
}

}  // namespace math
}  // namespace dawin_ext
