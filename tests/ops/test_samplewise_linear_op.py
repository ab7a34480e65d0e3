"""samplewise_linear against a float64 per-sample merge-then-linear, on every device and dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES

import dawin_ext
from dawin_ext.testing.reference_ops import samplewise_linear_reference

# fp32: merged weights and accumulation in fp32. fp16/bf16: the merged weights (CPU) or the partial
# outputs (CUDA) are rounded to the dtype once, so the error scales with sqrt(K) * eps.
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 6e-2, "rtol": 4e-2},
}


def reference64(x, weights, coefficients, biases=None):
    return samplewise_linear_reference(
        x.double().cpu(),
        weights.double().cpu(),
        coefficients.double().cpu(),
        None if biases is None else biases.double().cpu(),
    )


def make(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


# (B, middle dims, IN, OUT, S): empty batch, one row, odd sizes, IN and OUT across several blocks
# (the CPU kernel blocks IN by 384, OUT by 64 and rows by 256), several middle dims, S up to 9, empty IN or OUT.
SHAPES = [
    (0, (3,), 8, 5, 2),
    (1, (), 1, 1, 1),
    (1, (1,), 3, 7, 2),
    (2, (50,), 768, 130, 2),
    (3, (7,), 389, 67, 3),
    (2, (2, 3), 33, 129, 4),
    (4, (5,), 17, 9, 9),
    (2, (300,), 40, 70, 2),  # more rows per sample than one brgemm call takes (256)
    (2, (12,), 50, 270, 3),  # the CPU mixing path's wide output blocks (10-31 rows), S = 3
    (2, (40,), 33, 75, 5),  # its narrow blocks (>= 32 rows) with a runtime source count
    (2, (7,), 0, 5, 2),  # no input features: the output is the merged bias
    (2, (7,), 6, 0, 2),  # no output features
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-M{s[1]}-IN{s[2]}-OUT{s[3]}-S{s[4]}")
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64(device, dtype, shape, with_bias):
    b, mid, in_f, out_f, s = shape
    x = make((b, *mid, in_f), dtype, device)
    weights = make((s, out_f, in_f), dtype, device, scale=max(in_f, 1) ** -0.5)
    biases = make((s, out_f), dtype, device) if with_bias else None
    coefficients = torch.softmax(torch.randn(b, s, dtype=torch.float64), -1).float().to(device)
    with torch.no_grad():
        got = dawin_ext.samplewise_linear(x, weights, coefficients, biases)
    assert got.dtype == dtype and got.shape == (b, *mid, out_f) and got.device == x.device
    torch.testing.assert_close(got.cpu().double(), reference64(x, weights, coefficients, biases), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_strides_and_coefficient_dtypes(device):
    """The fast [S, IN, OUT] storage, plain [S, OUT, IN], sliced (offset, strided) views of both and a permuted
    input all give the same numbers, with rows per sample on both CPU paths (mixing from 10 rows, one
    concatenated-IN GEMM below); coefficients may be float64 or float16 and rows need not sum to 1."""
    plain = make((2, 150, 200), torch.float32, device, scale=0.07)
    fast = dawin_ext.samplewise_linear_weights(list(plain))
    assert fast.shape == plain.shape and fast.transpose(1, 2).is_contiguous()
    big = make((2, 301, 200), torch.float32, device, scale=0.07)
    sliced = big[:, 1::2]  # offset by one row, stride 2 along out_features
    fast_sliced = dawin_ext.samplewise_linear_weights(list(big))[:, 7:157]  # rows of W^T keep the full row stride
    biases = make((2, 150), torch.float32, device)
    for rows in (11, 4):
        x = make((3, rows, 200), torch.float32, device)
        permuted_x = make((rows, 3, 200), torch.float32, device).transpose(0, 1)
        for coefficients in (
            torch.tensor([[0.3, 0.7], [1.0, 0.0], [-0.5, 1.5]], dtype=torch.float64, device=device),
            torch.tensor([[0.5, 0.5], [2.0, 0.25], [0.0, 0.0]], dtype=torch.float16, device=device),
        ):
            c32 = coefficients.float()
            for w in (plain, fast, sliced, fast_sliced):
                for xi in (x, permuted_x):
                    for b in (biases, None):
                        got = dawin_ext.samplewise_linear(xi, w, coefficients, b)
                        ref = reference64(xi, w, c32, b)
                        torch.testing.assert_close(got.double().cpu(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_to_its_sample_only_and_inputs_not_mutated(device):
    x = make((3, 4, 40), torch.float32, device)
    weights = make((2, 70, 40), torch.float32, device)
    coefficients = torch.rand(3, 2, device=device)
    x[1, 2, 5] = float("nan")
    before = [t.clone() for t in (x, weights, coefficients)]
    got = dawin_ext.samplewise_linear(x, weights, coefficients)
    assert torch.isnan(got[1, 2]).all() and not torch.isnan(got[[0, 2]]).any() and not torch.isnan(got[1, :2]).any()
    for t, b in zip((x, weights, coefficients), before, strict=True):
        assert torch.equal(t.nan_to_num(), b.nan_to_num())
    weights[1, 3, 0] = float("nan")  # one source's weight: every sample that uses source 1 sees NaN in column 3
    got = dawin_ext.samplewise_linear(x.nan_to_num(), weights, coefficients)
    assert torch.isnan(got[..., 3]).all() and not torch.isnan(got[..., 4]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    x = torch.randn(2, 3, 8, device=device)
    w = torch.randn(2, 5, 8, device=device)
    c = torch.rand(2, 2, device=device)
    with pytest.raises(ValueError, match=r"input must be \[B, \.\.\., in_features\]"):
        dawin_ext.samplewise_linear(x[0, 0], w, c)
    with pytest.raises(ValueError, match=r"weights must be \[S sources, out_features, in_features\]"):
        dawin_ext.samplewise_linear(x, w[0], c)
    with pytest.raises(ValueError, match="in_features 8 but input's last dim is 7"):
        dawin_ext.samplewise_linear(x[..., :7], w, c)
    with pytest.raises(ValueError, match=r"coefficients must be \[B, S\] = \[2, 2\]"):
        dawin_ext.samplewise_linear(x, w, torch.rand(2, 3, device=device))
    with pytest.raises(ValueError, match=r"biases must be \[S, out_features\]"):
        dawin_ext.samplewise_linear(x, w, c, torch.randn(2, 4, device=device))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        dawin_ext.samplewise_linear(x.double(), w.double(), c)
    with pytest.raises(TypeError, match="weights are Half but input is Float; they must match"):
        dawin_ext.samplewise_linear(x, w.half(), c)
    with pytest.raises(TypeError, match="coefficients must be floating point"):
        dawin_ext.samplewise_linear(x, w, torch.ones(2, 2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="need 1 to 16 weight sources"):
        dawin_ext.samplewise_linear(x, torch.randn(17, 5, 8, device=device), torch.rand(2, 17, device=device))
    with pytest.raises(RuntimeError, match="has no backward"):
        dawin_ext.samplewise_linear(x.requires_grad_(True), w, c)
    with pytest.raises(ValueError, match=r"need S weights of one \[OUT, IN\] shape"):
        dawin_ext.samplewise_linear_weights([w[0], w[1, :4]])


def test_mixed_devices_are_refused():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="weights are on meta but input is on cpu"):
        dawin_ext.samplewise_linear(x, torch.randn(2, 5, 8, device="meta"), torch.rand(2, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 40, device=device)
    w = dawin_ext.samplewise_linear_weights(list(torch.randn(3, 24, 40, device=device)))
    c = torch.rand(2, 3, device=device)
    op = torch.ops.dawin_ext.samplewise_linear.default
    torch.library.opcheck(op, (x, w, torch.randn(3, 24, device=device), c))
    torch.library.opcheck(op, (x.bfloat16(), w.bfloat16(), None, c))


def test_cpu_fast_path_is_reported():
    """The fp32 CPU path in use is visible, so a benchmark never reports the slow path as the fast one."""
    assert dawin_ext.ops.samplewise_linear_cpu_path() in ("brgemm", "stacked")


def test_compiles_with_torch_compile():
    x = torch.randn(2, 3, 16)
    w = torch.randn(2, 8, 16)
    c = torch.rand(2, 2)
    f = torch.compile(lambda x, w, c: dawin_ext.samplewise_linear(x, w, c).relu(), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, w, c), dawin_ext.samplewise_linear(x, w, c).relu())
