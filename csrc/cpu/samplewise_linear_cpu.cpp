// CPU samplewise_linear: out[b] = x[b] @ (sum_s c[b, s] W_s)^T + sum_s c[b, s] bias_s.
//
// Fast path (fp32, oneDNN's brgemm micro-kernel available): work items are (block of block_out output
// features, sample b), samples innermost so that the sources' weight block stays in L2 across samples.
// For each item the sample's merged weights of that block are formed in a thread-local buffer
// (cpu::blend_rows_f32, blend's row kernel) and multiplied by the sample's rows with brgemm straight from L2. Forming
// costs S multiply-adds per weight per sample against M (rows per sample) for the GEMM, so for a ViT with M = 50 tokens
// the whole layer costs about 1.2-1.5x one plain GEMM, where the stacked GEMM of AffineStack's "out" mode costs S x
// (measured in benchmarks/RESULTS.md).
//
// Fewer than kMinRowsForMixing rows per sample in fp32, or a torch without the brgemm micro-kernel, take one
// GEMM over the S sources' concatenated inner dimensions (S x the FLOPs, no per-sample weights); other dtypes
// take S plain GEMMs blended per sample in fp32. _samplewise_linear_cpu_path() reports whether brgemm is usable.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "../ops.h"
#include "cpu_kernels.h"

namespace dawin_ext {

namespace {
// Output features per work item. Wide (256) for the concatenated-K GEMM and for mixing with few rows per sample
// (16 output positions of a convolution): four times fewer, larger brgemm calls ran a [B=16, 16, 2304] x [2304, 256]
// layer 1.2-1.4x a plain GEMM instead of 2.0x. Narrow (64) for mixing from kManyRows rows per sample: there the S
// sources' [kBlockIn, 256] blocks and the merged one (1.15 MiB for S = 2) overflow a 1 MiB L2, and ViT-B-32's MLP
// output layer (50 rows, 3072 -> 768) ran 1.4-1.8x a plain GEMM against 1.15-1.3x with 64 (1 thread, 2-core AVX512 VM).
constexpr int64_t kBlockOutWide = 256;
constexpr int64_t kBlockOutNarrow = 64;
constexpr int64_t kManyRows = 32;
constexpr int64_t kBlockIn = 384;  // input features per brgemm call
constexpr int64_t kBlockM = 256;   // rows per brgemm call
// Below this many rows per sample, forming merged weights costs more than the concatenated-K GEMM (S x the
// FLOPs of one GEMM on brgemm): on a 2-core AVX512 VM, 1 thread, S = 2, batch 16, layers of 160-1280 features,
// that GEMM cost 1.6-2.2x a plain one at 4-10 rows, mixing 2.0-2.6x at 6-8 rows and 1.5-2.0x at 10.
constexpr int64_t kMinRowsForMixing = 10;

bool probe_brgemm() {
  // Builds without oneDNN's ukernel raise from brgemm; check the arithmetic too.
  try {
    float a[2] = {2.f, 5.f}, b[2] = {3.f, 7.f}, c[1] = {1.f};
    at::native::cpublas::brgemm(1, 1, 2, 2, 1, 1, /*add_C=*/true, a, b, c, /*is_vnni=*/false);
    at::native::cpublas::brgemm_release(false);
    return c[0] == 42.f;
  } catch (const c10::Error&) {
    return false;
  }
}

void samplewise_linear_brgemm(const at::Tensor& x, const at::Tensor& wt, const at::Tensor* bias_rows,
                              const at::Tensor& c, at::Tensor& out) {
  // x [B, M, IN] contiguous, wt [S, IN, OUT] with unit stride along OUT (fp32); c [B, S]; bias_rows [B, OUT] or
  // null; out [B, M, OUT].
  const int64_t B = x.size(0), M = x.size(1), IN = x.size(2), S = wt.size(0), OUT = wt.size(2);
  const float* xp = x.const_data_ptr<float>();
  const float* wp = wt.const_data_ptr<float>();
  const float* cp = c.const_data_ptr<float>();
  const float* bp = bias_rows ? bias_rows->const_data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t block_out = M >= kManyRows ? kBlockOutNarrow : kBlockOutWide;
  const int64_t blocks = (OUT + block_out - 1) / block_out;
  at::parallel_for(0, blocks * B, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> merged(static_cast<size_t>(std::min(kBlockIn, IN) * std::min(block_out, OUT)));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t j = item / B, b = item % B;
      const int64_t out0 = j * block_out, nout = std::min(block_out, OUT - out0);
      float* ob = op + b * M * OUT + out0;
      if (bp) {
        for (int64_t m = 0; m < M; ++m) std::copy(bp + b * OUT + out0, bp + b * OUT + out0 + nout, ob + m * OUT);
      }
      for (int64_t in0 = 0; in0 < IN; in0 += kBlockIn) {
        const int64_t nin = std::min(kBlockIn, IN - in0);
        cpu::blend_rows_f32(wp + in0 * wt.stride(1) + out0, wt.stride(0), wt.stride(1), cp + b * S, static_cast<int>(S),
                            nin, nout, merged.data());
        const bool accumulate = bp != nullptr || in0 > 0;
        for (int64_t m0 = 0; m0 < M; m0 += kBlockM) {
          const int64_t mm = std::min(kBlockM, M - m0);
          at::native::cpublas::brgemm(mm, nout, nin, /*ld_a=*/IN, /*ld_b=*/nout, /*ld_c=*/OUT, accumulate,
                                      xp + (b * M + m0) * IN + in0, merged.data(), ob + m0 * OUT, /*is_vnni=*/false);
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}

// Few rows per sample in fp32: the S sources' GEMMs as one GEMM over a concatenated inner dimension,
// out[b] = [c_b0 x_b | ... | c_b(S-1) x_b] @ [W_0^T; ...; W_(S-1)^T]. The weights' [S, IN, OUT] storage (the
// layout samplewise_linear_weights builds) is that [S*IN, OUT] matrix already, and the scaled copies of x cost
// B*M*S*IN, so no [S, rows, OUT] partial outputs are written and blended (the stacked path below was 2.4-2.8x
// a plain GEMM at 4 rows per sample; one GEMM with S times the inner dimension costs about S x).
void samplewise_linear_kstacked(const at::Tensor& x, const at::Tensor& wt, const at::Tensor* bias_rows,
                                const at::Tensor& c, at::Tensor& out) {
  const int64_t B = x.size(0), M = x.size(1), IN = x.size(2), S = wt.size(0), OUT = wt.size(2);
  const at::Tensor xs = (x.unsqueeze(2) * c.view({B, 1, S, 1})).view({B * M, S * IN});
  // A view where the layout allows (slices along OUT keep their row stride), a copy otherwise.
  at::Tensor w2 = wt.reshape({S * IN, OUT});
  if (w2.stride(1) != 1) w2 = w2.contiguous();
  at::Tensor out2 = out.view({B * M, OUT});
  if (bias_rows) out2.view({B, M, OUT}).copy_(bias_rows->unsqueeze(1).expand({B, M, OUT}));
  if (!samplewise_linear_has_brgemm()) {
    if (bias_rows) {
      out2.addmm_(xs, w2);
    } else {
      at::mm_out(out2, xs, w2);
    }
    return;
  }
  // brgemm reads the weights in place block by block; a library GEMM packs all of them first, which at a few
  // dozen rows costs as much as the multiplication.
  const int64_t R = B * M, K = S * IN;
  const float* ap = xs.const_data_ptr<float>();
  const float* wp = w2.const_data_ptr<float>();
  const int64_t ldb = w2.stride(0);
  float* op = out2.data_ptr<float>();
  const int64_t row_blocks = (R + kBlockM - 1) / kBlockM, out_blocks = (OUT + kBlockOutWide - 1) / kBlockOutWide;
  at::parallel_for(0, row_blocks * out_blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t r0 = (item % row_blocks) * kBlockM, out0 = (item / row_blocks) * kBlockOutWide;
      const int64_t mm = std::min(kBlockM, R - r0), nout = std::min(kBlockOutWide, OUT - out0);
      for (int64_t k0 = 0; k0 < K; k0 += kBlockIn) {
        const int64_t nk = std::min(kBlockIn, K - k0);
        at::native::cpublas::brgemm(mm, nout, nk, /*ld_a=*/K, /*ld_b=*/ldb, /*ld_c=*/OUT,
                                    /*add_C=*/bias_rows != nullptr || k0 > 0, ap + r0 * K + k0, wp + k0 * ldb + out0,
                                    op + r0 * OUT + out0, /*is_vnni=*/false);
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}

// The S partial outputs x @ W_s^T over all rows at once, blended per sample: S plain GEMMs, for any
// dtype. Used where mixing does not pay: few rows per sample (the merge would cost more than the
// GEMM), other dtypes (computed in fp32 and rounded once), or no brgemm.
void samplewise_linear_stacked(const at::Tensor& x, const at::Tensor& weights, const at::Tensor* bias_rows,
                               const at::Tensor& c, at::Tensor& out) {
  const int64_t B = x.size(0), M = x.size(1), IN = x.size(2), S = weights.size(0), OUT = weights.size(1);
  const at::Tensor x2 = x.reshape({B * M, IN}).to(at::kFloat);
  const at::Tensor c_rows = c.repeat_interleave(M, 0);  // [B * M, S]
  at::Tensor acc = bias_rows ? bias_rows->repeat_interleave(M, 0) : at::zeros({B * M, OUT}, x2.options());
  for (int64_t s = 0; s < S; ++s) {
    acc.addcmul_(at::mm(x2, weights[s].t().to(at::kFloat)), c_rows.narrow(1, s, 1));
  }
  out.copy_(acc.view({B, M, OUT}));
}
}  // namespace

bool samplewise_linear_has_brgemm() {
  static const bool ok = probe_brgemm();
  return ok;
}

at::Tensor samplewise_linear_cpu(const at::Tensor& input, const at::Tensor& weights,
                                 const std::optional<at::Tensor>& biases, const at::Tensor& coefficients) {
  check_samplewise_linear_args(input, weights, biases, coefficients);
  const int64_t B = input.size(0), IN = input.size(-1), OUT = weights.size(1);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = OUT;
  at::Tensor out = at::empty(shape, input.options());
  if (out.numel() == 0) return out;
  const int64_t M = out.numel() / (B * OUT);
  const at::Tensor x = input.reshape({B, M, IN}).contiguous();
  const at::Tensor c = coefficients.to(at::kFloat).contiguous();
  at::Tensor out3 = out.view({B, M, OUT});
  at::Tensor bias_rows;
  if (biases) bias_rows = at::mm(c, biases->to(at::kFloat)).contiguous();  // [B, OUT] merged bias per sample
  const at::Tensor* bias_ptr = biases ? &bias_rows : nullptr;
  // One source has nothing to mix: the concatenated-K GEMM is then that source's GEMM on brgemm, without the
  // mixing path's copy of every weight block per sample.
  const int64_t S = weights.size(0);
  if (input.scalar_type() == at::kFloat && S > 1 && M >= kMinRowsForMixing && IN > 0 &&
      samplewise_linear_has_brgemm()) {
    // The kernel reads rows of W_s^T: weights with unit stride along out_features (the layout
    // samplewise_linear_weights builds, and slices of it) are used in place, others are copied per call.
    at::Tensor wt = weights.transpose(1, 2);
    if (wt.stride(2) != 1) wt = wt.contiguous();
    samplewise_linear_brgemm(x, wt, bias_ptr, c, out3);
  } else if (input.scalar_type() == at::kFloat && IN > 0) {
    samplewise_linear_kstacked(x, weights.transpose(1, 2), bias_ptr, c, out3);
  } else {
    samplewise_linear_stacked(x, weights, bias_ptr, c, out3);
  }
  return out;
}

}  // namespace dawin_ext
