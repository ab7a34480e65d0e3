"""The CUDA kernels' grids, run thread by thread on the CPU, against float64.

No GPU has run this project's CUDA kernels. Their per-thread work lives in csrc/common/*_kernel.h as
``__host__ __device__`` functions that the ``__global__`` wrappers call; the private
``dawin_ext::_emulate_*_cuda`` ops (csrc/cpu/cuda_emulation.cpp) call the same functions for every
thread of the same grid, with arrays in place of warp shuffles (same butterfly order). These tests
reach every kernel and specialisation over odd shapes, misaligned offsets and every dtype, so the
kernels' own index and alignment decisions, head / vector / tail splits, the warp-or-block choice,
blend's re-read path and the merges are checked on the CPU. scripts/asan_check.sh runs this file
under AddressSanitizer, where every index a thread computes is bounds-checked (each view here ends
at the end of its allocation, so one element too far is a report, not a silent read).

Not covered (see README): real shuffles and shared-memory races, cuBLAS, streams and graphs.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FLOAT_DTYPES

import dawin_ext  # noqa: F401  (loads the ops)
from dawin_ext.testing.reference_ops import samplewise_depthwise_conv2d_reference

ops = torch.ops.dawin_ext
VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8, torch.float64: 2}  # elements per 16-byte load
H200_SMS = 132
WARP_ROW_MAX_C = 4096  # kernels::entropy::kWarpRowMaxC
CHUNK = 65536  # kernels::blend::kChunk

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def tail_view(shape: tuple[int, ...], dtype: torch.dtype, offset: int, gen: torch.Generator, scale: float = 3.0):
    """A contiguous tensor of `shape` that starts `offset` elements into its allocation and ends at its end."""
    n = math.prod(shape)
    buf = (torch.randn(offset + n, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return buf[offset:].view(shape)


# ----------------------------------------------------------------------------------------------
# softmax_entropy: entropy_warp_rows_kernel (C <= 4096) and entropy_block_rows_kernel
# ----------------------------------------------------------------------------------------------
def entropy64(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(x.double() / temperature, dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


ENTROPY_TOL = {torch.float32: 2e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5}


def emulate_entropy(x: torch.Tensor, temperature: float, sms: int) -> torch.Tensor:
    got, kernel = ops._emulate_softmax_entropy_cuda(x, temperature, sms)
    assert kernel == ("warp_rows" if x.shape[-1] <= WARP_ROW_MAX_C else "block_rows"), (x.shape, kernel)
    assert got.dtype == torch.float32 and got.shape == x.shape[:-1]
    return got


def check_entropy(x: torch.Tensor, temperature: float = 1.0, sms: int = H200_SMS) -> torch.Tensor:
    got = emulate_entropy(x, temperature, sms)
    tol = ENTROPY_TOL[x.dtype]
    torch.testing.assert_close(got.double(), entropy64(x, temperature), atol=tol, rtol=tol, equal_nan=True)
    return got


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(1, 1), (3, 2), (5, 7), (9, 31), (4, 32), (4, 33), (3, 65), (2, 257), (3, 1000), (2, 4095), (2, 4096)]
    + [(2, 4097), (1, 5003), (2, 9001), (1, 16411)],
)
def test_entropy_shapes_and_head_offsets(dtype, shape, gen):
    # Offsets 0 .. V-1 elements give every head length (elements read one by one before the first
    # 16-byte boundary); rows of C not a multiple of V have every row at a different head.
    for offset in range(VEC[dtype]):
        check_entropy(tail_view(shape, dtype, offset, gen), 0.83)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sms", [1, 2, H200_SMS])
def test_entropy_grid_stride_loops(dtype, sms, gen):
    # Few multiprocessors: few blocks, so every warp (or block) walks many rows.
    check_entropy(tail_view((301, 37), dtype, 1, gen), 1.0, sms)
    check_entropy(tail_view((9, 4099), dtype, 3, gen), 1.7, sms)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("C", [5, 64, 300, 6000])
def test_entropy_strided_views(dtype, C, gen):
    base = tail_view((6, 2 * C + 1), dtype, 0, gen)
    check_entropy(base[:, 1::2])  # class stride 2: element by element
    check_entropy(tail_view((C, 7), dtype, 0, gen).t())  # transposed
    check_entropy(base[2:5, 1 : C + 1])  # row stride not a multiple of the vector width, offset start
    check_entropy(tail_view((1, C), dtype, 0, gen).expand(3, C))  # row stride 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("C", [40, 1000, 5000])
def test_entropy_special_values(dtype, C, gen):
    x = tail_view((8, C), dtype, 1, gen).clone()
    x[0, ::3] = float("-inf")
    x[1] = float("-inf")
    x[1, C // 2] = 2.0  # one finite entry: H = 0
    x[2] = float("-inf")  # no distribution: NaN
    x[3, C - 1] = float("nan")  # NaN in the tail
    x[4, 1] = float("inf")  # +inf in the head: NaN
    x[5, : C // 2] = -float("inf")
    x[6, C - 2] = 1e4 if dtype != torch.float16 else 6e4  # one huge logit in the last vector
    x[7] = 0.0  # uniform: H = log C
    got = check_entropy(x)
    assert got[1].item() == 0.0
    assert torch.isnan(got[[2, 3, 4]]).all()
    assert abs(got[7].item() - math.log(C)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [64, 1000, 4096, 5000, 20000])
def test_entropy_merge_of_maxima_further_apart_than_the_float_range(dtype, C):
    """Lanes, warps and vector blocks holding only -3e38 merge with ones holding 3e38.

    exp(-3e38 - 3e38) = exp(-inf) = 0 rescaled t by 0 * (-inf) = NaN; every row here has k entries
    of 3e38 and the rest -3e38, so H = log k, in whichever lane, warp or block the maxima fall.
    """
    k = 3
    x = torch.full((4, C), -3e38, dtype=dtype)
    x[0, :k] = 3e38  # maxima in the first lanes
    x[1, -k:] = 3e38  # in the tail
    x[2, C // 2 : C // 2 + k] = 3e38
    x[3, torch.arange(k) * (C // k)] = 3e38  # spread over the row
    got = check_entropy(x)
    torch.testing.assert_close(got.double(), torch.full((4,), math.log(k), dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_entropy_batched_3d_and_temperatures(gen):
    x = tail_view((3, 5, 4100), torch.bfloat16, 5, gen)
    for t in (0.37, 1.0, 2.5):
        check_entropy(x, t)
    check_entropy(tail_view((2, 3, 11), torch.float16, 3, gen).permute(2, 0, 1), 0.9)


def test_entropy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        ops._emulate_softmax_entropy_cuda(torch.randn(2, 3), 0.0, 1)
    with pytest.raises(ValueError, match="num_sms"):
        ops._emulate_softmax_entropy_cuda(torch.randn(2, 3), 1.0, 0)


# ----------------------------------------------------------------------------------------------
# blend: blend_kernel<reread, S, K> in its six specialisations
# ----------------------------------------------------------------------------------------------
BLEND_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# Sizes: tiny, one vector plus a tail, exactly one chunk, two chunks plus a partial vector.
BLEND_SIZES = [1, 3, 9, 33, CHUNK, 2 * CHUNK + 13]


def expected_blend(sources: list[list[torch.Tensor]], coef: torch.Tensor) -> list[list[torch.Tensor]]:
    """out[k][n] = sum_s coef[k, s] * sources[s][n] in float64, with the coefficients the kernel uses
    for tensor n: double for float64 tensors, rounded to fp32 for the others."""
    K, S = coef.shape

    def c(k: int, s: int, n: int) -> torch.Tensor:
        return coef[k, s] if sources[0][n].dtype == torch.float64 else coef[k, s].float().double()

    return [
        [sum(c(k, s, n) * sources[s][n].double() for s in range(S)) for n in range(len(sources[0]))] for k in range(K)
    ]


class GuardedOutputs:
    """Outputs as views into NaN-filled buffers, with a guard band before and after each, so that a
    write one element outside an output is seen (and, under ASan, the view's end is the buffer's)."""

    def __init__(self, K: int, numels: list[int], dtypes: list[torch.dtype], offset: int):
        self.bufs, self.views = [], []
        for _ in range(K):
            row = []
            for numel, dtype in zip(numels, dtypes, strict=True):
                buf = torch.full((offset + numel + 7,), float("nan"), dtype=dtype)
                self.bufs.append((buf, offset, numel))
                row.append(buf[offset : offset + numel])
            self.views.append(row)

    def flat(self) -> list[torch.Tensor]:
        return [t for row in self.views for t in row]

    def check_guards(self) -> None:
        for buf, offset, numel in self.bufs:
            assert torch.isnan(buf[:offset]).all() and torch.isnan(buf[offset + numel :]).all(), "write outside output"


def run_blend(sources, coef, outs: list[list[torch.Tensor]], overlap: bool, kernel: str = "auto") -> str:
    flat_src = [t for row in sources for t in row]
    flat_out = [t for row in outs for t in row]
    return ops._emulate_blend_cuda(flat_src, coef, flat_out, overlap, kernel)


def check_blend(
    S: int,
    K: int,
    dtypes: list[torch.dtype],
    numels: list[int],
    gen,
    *,
    src_offset: int = 0,
    out_offset: int = 0,
    kernel: str = "auto",
    want_kernel: str | None = None,
) -> None:
    sources = [
        [tail_view((n,), d, src_offset, gen, 1.0) for n, d in zip(numels, dtypes, strict=True)] for _ in range(S)
    ]
    before = [[t.clone() for t in row] for row in sources]
    coef = torch.randn(K, S, generator=gen, dtype=torch.float64)
    outs = GuardedOutputs(K, numels, dtypes, out_offset)
    ran = run_blend(sources, coef, outs.views, False, kernel)
    if want_kernel is not None:
        assert ran == want_kernel
    outs.check_guards()
    want = expected_blend(sources, coef)
    for k in range(K):
        for n, d in enumerate(dtypes):
            atol, rtol = BLEND_TOL[d]
            torch.testing.assert_close(
                outs.views[k][n].double(),
                want[k][n],
                atol=atol,
                rtol=rtol,
                msg=lambda m, k=k, n=n, d=d: f"output {k} of tensor {n} ({d}): {m}",
            )
    for row, row0 in zip(sources, before, strict=True):
        for t, t0 in zip(row, row0, strict=True):
            assert torch.equal(t, t0), "a source changed"


AUTO_KERNEL = {(2, 1): "S2K1", (2, 2): "S2K2", (2, 3): "S2K3", (2, 4): "S2K4", (1, 1): "reread", (3, 2): "reread"}
AUTO_KERNEL.update({(16, 16): "reread", (5, 1): "reread", (2, 5): "reread"})


@pytest.mark.parametrize("SK", sorted(AUTO_KERNEL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_blend_each_specialisation_aligned_and_misaligned(SK, dtype, gen):
    S, K = SK
    numels = BLEND_SIZES if S * K <= 8 else BLEND_SIZES[:4] + [CHUNK + 5]
    dtypes = [dtype] * len(numels)
    # Vector path (every pointer aligned), then a misaligned source or output: the whole chunk scalar.
    check_blend(S, K, dtypes, numels, gen, want_kernel=AUTO_KERNEL[SK])
    check_blend(S, K, dtypes, numels, gen, src_offset=1, want_kernel=AUTO_KERNEL[SK])
    check_blend(S, K, dtypes, numels, gen, out_offset=VEC[dtype] - 1, want_kernel=AUTO_KERNEL[SK])
    # Aligned at a 16-byte step of another alignment than the allocator's.
    check_blend(S, K, dtypes, numels, gen, src_offset=VEC[dtype], out_offset=3 * VEC[dtype])


@pytest.mark.parametrize("kernel", ["generic", "reread"])
@pytest.mark.parametrize("SK", [(2, 1), (2, 4), (3, 3), (16, 1)])
def test_blend_runtime_size_kernels_on_every_shape(kernel, SK, gen):
    # The runtime-S/K kernels also blend what the fixed-size ones take on the GPU.
    S, K = SK
    dtypes = [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.float32]
    check_blend(S, K, dtypes, [7, 65, CHUNK + 3, 1, 100], gen, kernel=kernel, want_kernel=kernel)
    check_blend(S, K, dtypes, [7, 65, CHUNK + 3, 1, 100], gen, src_offset=1, kernel=kernel, want_kernel=kernel)


def test_blend_mixed_dtypes_in_one_launch(gen):
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16] * 2
    numels = [5, CHUNK + 1, 17, 3, 1, 40, 2 * CHUNK, 8]
    for S, K in [(2, 3), (4, 2), (3, 16)]:
        check_blend(S, K, dtypes, numels, gen)
        check_blend(S, K, dtypes, numels, gen, out_offset=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("SK", [(2, 2), (3, 1), (3, 3), (16, 2)])
def test_blend_in_place_runs_the_register_kernel(dtype, SK, gen):
    """Output 0 is source 0 (an in-place blend): the CUDA host picks a kernel that loads all sources
    first (the fixed-size one for S = 2, else the generic one), and the result is right."""
    S, K = SK
    numels = [CHUNK + 9, 4]
    sources = [[tail_view((n,), dtype, 0, gen, 1.0) for n in numels] for _ in range(S)]
    original = [[t.clone() for t in row] for row in sources]
    coef = torch.randn(K, S, generator=gen, dtype=torch.float64)
    outs = [sources[0]] + [[torch.empty(n, dtype=dtype) for n in numels] for _ in range(K - 1)]
    ran = run_blend(sources, coef, outs, True)
    assert ran == (f"S2K{K}" if S == 2 else "generic")
    want = expected_blend(original, coef)
    atol, rtol = BLEND_TOL[dtype]
    for k in range(K):
        for n in range(len(numels)):
            torch.testing.assert_close(outs[k][n].double(), want[k][n], atol=atol, rtol=rtol)


def test_blend_reread_kernel_is_wrong_in_place():
    """The emulation runs the re-read kernel's real order: forced onto an in-place blend, output 1
    reads source 0 after output 0 overwrote it. This is why the host must not pick it there."""
    a, b = torch.ones(1000), torch.full((1000,), 3.0)
    other = torch.empty(1000)
    coef = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    assert run_blend([[a], [b]], coef, [[a], [other]], True, "reread") == "reread"
    assert torch.equal(a, torch.full((1000,), 2.0))
    assert torch.equal(other, torch.full((1000,), 2.0)), "expected the stale read (1.0 would be right)"


def test_blend_kernel_choice_and_errors():
    x = [torch.randn(4)]
    outs = [torch.empty(4)]
    assert ops._emulate_blend_cuda(x + x, torch.ones(1, 2, dtype=torch.float64), outs, False, "auto") == "S2K1"
    with pytest.raises(ValueError, match="kernel S2K3 cannot blend S=2 sources into K=1"):
        ops._emulate_blend_cuda(x + x, torch.ones(1, 2, dtype=torch.float64), outs, False, "S2K3")
    with pytest.raises(ValueError, match="unknown kernel"):
        ops._emulate_blend_cuda(x + x, torch.ones(1, 2, dtype=torch.float64), outs, False, "fast")


# ----------------------------------------------------------------------------------------------
# sample_combine: sample_combine_kernel<scalar_t, V> and <scalar_t, 1>
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 2, 4, 8), (2, 3, 5, 16), (2, 1, 3, 1003), (4, 2, 7, 40)])
@pytest.mark.parametrize("offset", [0, 1, 8])
@pytest.mark.parametrize("sms", [1, H200_SMS])
def test_sample_combine_vector_and_scalar_kernels(dtype, shape, offset, sms, gen):
    B, M, S, N = shape
    x = tail_view(shape, dtype, offset, gen, 1.0)
    w = torch.randn(B, S, generator=gen)
    got, kernel = ops._emulate_sample_combine_cuda(x, w, sms)
    vector = N % VEC[dtype] == 0 and offset % VEC[dtype] == 0
    assert kernel == ("vector" if vector else "scalar")
    want = torch.einsum("bmsn,bs->bmn", x.double(), w.double())
    tol = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1.6e-2)
    assert got.dtype == dtype and got.shape == (B, M, N)
    torch.testing.assert_close(got.double(), want, atol=tol * S, rtol=tol)


def test_sample_combine_non_contiguous_and_reduced_weights(gen):
    x = tail_view((3, 2, 5, 24), torch.float32, 0, gen).transpose(0, 1).contiguous().transpose(0, 1)
    w = torch.randn(3, 5, generator=gen).to(torch.bfloat16)
    got, _ = ops._emulate_sample_combine_cuda(x, w, 1)
    torch.testing.assert_close(got.double(), torch.einsum("bmsn,bs->bmn", x.double(), w.double()), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# samplewise_linear: the blend_partials_kernel after the (cuBLAS, here CPU) GEMMs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [((3, 5), 1, 7), ((2, 4, 9), 4, 33), ((5, 37), 16, 3), ((1, 1, 1, 6), 2, 1)])
@pytest.mark.parametrize("sms", [1, H200_SMS])
def test_samplewise_linear_blend_kernel(dtype, bias, shape, sms, gen):
    in_shape, G, N = shape
    B, Kdim = in_shape[0], in_shape[-1]
    x = torch.randn(in_shape, generator=gen).to(dtype)
    W = (torch.randn(G, N, Kdim, generator=gen) / 4).to(dtype)
    bs = torch.randn(G, N, generator=gen).to(dtype) if bias else None
    c = torch.randn(B, G, generator=gen)
    got = ops._emulate_samplewise_linear_cuda(x, W, bs, c, sms)
    xs = x.double().reshape(B, -1, Kdim)
    # The kernel blends partial outputs rounded to the input dtype; the reference does the same.
    partial = torch.einsum("bmk,gnk->gbmn", xs, W.double()).to(dtype).double()
    want = torch.einsum("gbmn,bg->bmn", partial, c.double())
    if bias:
        want = want + (c.double() @ bs.double())[:, None, :]
    want = want.reshape(*in_shape[:-1], N)
    tol = 1e-5 if dtype == torch.float32 else (4e-3 if dtype == torch.float16 else 3e-2)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=tol * G, rtol=tol)


# ---------------------------------------------------------------------------------------------
# samplewise_depthwise_conv2d: depthwise_mix_kernel, then depthwise_conv_kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "geometry",
    [
        ((2, 40, 6, 6), (7, 7), 1, 3, 1),
        ((3, 17, 9, 11), (3, 5), (2, 1), (1, 2), (1, 2)),
        ((1, 3, 2, 2), (7, 7), 1, 3, 1),
        ((2, 5, 4, 7), (1, 1), 2, 0, 1),
    ],
)
@pytest.mark.parametrize("sms", [1, H200_SMS])
def test_samplewise_depthwise_kernels(dtype, bias, geometry, sms, gen):
    (b, c, h, w), (kh, kw), stride, padding, dilation = geometry
    x = torch.randn(b, c, h, w, generator=gen).to(dtype)
    weights = (torch.randn(3, c, 1, kh, kw, generator=gen) / kh).to(dtype)
    biases = torch.randn(3, c, generator=gen).to(dtype) if bias else None
    coef = torch.randn(b, 3, generator=gen)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    args = (x, weights, biases, coef, pair(stride), pair(padding), pair(dilation))
    got = ops._emulate_samplewise_depthwise_conv2d_cuda(*args, sms)
    want = samplewise_depthwise_conv2d_reference(
        x.double(),
        weights.double(),
        coef.double(),
        None if biases is None else biases.double(),
        stride,
        padding,
        dilation,
    )
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if dtype == torch.float32 else (4e-3 if dtype == torch.float16 else 3e-2)
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    # The CPU kernel adds the same fp32 terms in the same order (common/samplewise_depthwise_kernel.h).
    cpu = ops.samplewise_depthwise_conv2d(*args)
    if ops._cpu_isa() != "DEFAULT":  # the baseline copy's vector multiply-add is not fused
        assert torch.equal(got, cpu)
