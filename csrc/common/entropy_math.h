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

#include "hd.h"

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
  // r == 0: the old terms vanish against the new max. The shift can be -inf (maxima -3e38 and
  // 3e38 differ by more than the float range) or shift * s can overflow, and 0 * (-inf) would turn
  // the state into NaN. r > 0 needs shift > -104, where shift * s stays finite.
  if (r == 0.f) return EntropyState{new_m, 0.f, 0.f};
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

// Opens a block of elements whose max is block_max (NaN if the block holds a NaN): rescales st to
// max(st.m, block_max) and says whether the block's elements must then be added with
// entropy_state_accumulate (or a SIMD equivalent that adds the same terms to st.s and st.t).
// Returns false when there is nothing to add: the state became NaN (NaN or +inf seen: the entropy
// is undefined) or everything seen so far is -inf. This is the one-pass two-level scheme shared by
// the CPU (block = up to a few thousand elements) and CUDA (block = one vector load) kernels.
DAWIN_HD bool entropy_state_begin_block(EntropyState& st, float block_max) {
  const float inf = std::numeric_limits<float>::infinity();
  if (block_max != block_max || st.m != st.m || block_max == inf) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    st = EntropyState{nan, nan, nan};
    return false;
  }
  if (block_max > st.m) st = entropy_state_rescale(st, block_max);
  return st.m != -inf;
}

// Max of n values that propagates NaN (fmaxf would drop it).
DAWIN_HD float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// Adds n values as one block: one max, then one exp per element.
DAWIN_HD void entropy_state_push_block(EntropyState& st, const float* z, int n) {
  float bm = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i) bm = nan_max(bm, z[i]);
  if (!entropy_state_begin_block(st, bm)) return;
  for (int i = 0; i < n; ++i) entropy_state_accumulate(st, z[i]);
}

// Adds one element with the online rule (max may move).
DAWIN_HD void entropy_state_push(EntropyState& st, float z) { entropy_state_push_block(st, &z, 1); }

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
