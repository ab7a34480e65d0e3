"""samplewise_depthwise_conv2d against per-sample merging in float64, on every device and dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES

import dawin_ext
from dawin_ext.testing.reference_ops import samplewise_depthwise_conv2d_reference

op = torch.ops.dawin_ext.samplewise_depthwise_conv2d

# fp32 accumulation, one rounding to the output dtype; relative to the output's scale.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (B, C, H, W, KH, KW, S, stride, padding, dilation): convnext's 7x7 layers at every stage's map size, odd channel
# counts (vector tails, C < one vector, C > one 8-vector chunk), strides, dilations, even and 1x1 kernels, and
# kernels larger than the input (taps that only ever read padding).
CASES = [
    (3, 40, 16, 16, 7, 7, 2, 1, 3, 1),
    (2, 80, 8, 8, 7, 7, 2, 1, 3, 1),
    (2, 160, 4, 4, 7, 7, 3, 1, 3, 1),
    (2, 320, 2, 2, 7, 7, 2, 1, 3, 1),
    (1, 1, 5, 4, 3, 3, 1, 1, 1, 1),
    (2, 17, 9, 11, 3, 5, 4, (2, 1), (1, 2), (1, 2)),
    (2, 129, 7, 6, 2, 4, 2, 1, (0, 2), 1),
    (3, 33, 10, 9, 5, 3, 2, (3, 2), 2, (2, 3)),
    (2, 300, 5, 3, 1, 1, 4, 2, 0, 1),
    (1, 7, 3, 3, 9, 9, 2, 1, 4, 1),
]


def _case(shape, dtype, device, gen, bias=True):
    b, c, h, w, kh, kw, s = shape[:7]
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype).to(device)
    weights = (torch.randn(s, c, 1, kh, kw, generator=gen, dtype=torch.float64) / kh).to(dtype).to(device)
    biases = torch.randn(s, c, generator=gen, dtype=torch.float64).to(dtype).to(device) if bias else None
    coef = torch.softmax(torch.randn(b, s, generator=gen, dtype=torch.float64), -1).float().to(device)
    return x, weights, biases, coef


def _reference(x, weights, biases, coef, stride, padding, dilation):
    return samplewise_depthwise_conv2d_reference(
        x.double().cpu(),
        weights.double().cpu(),
        coef.double().cpu(),
        None if biases is None else biases.double().cpu(),
        stride,
        padding,
        dilation,
    )


def _close(got, want, dtype):
    scale = want.abs().max().item() or 1.0
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max abs diff {err:.3g} at output scale {scale:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s[:7])))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64(device, dtype, shape, bias, gen):
    x, w, b, c = _case(shape, dtype, device, gen, bias)
    stride, padding, dilation = shape[7:]
    got = dawin_ext.samplewise_depthwise_conv2d(x, w, c, b, stride, padding, dilation)
    want = _reference(x, w, b, c, stride, padding, dilation)
    assert got.dtype == dtype and got.shape == want.shape and got.device == x.device
    assert got.is_contiguous(memory_format=torch.channels_last)
    _close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_and_coefficient_dtypes(device, gen):
    """Any input, weight, bias and coefficient layout gives the same result (the kernel reads channels-last and
    [S, T, C] rows; everything else is converted or read through its strides)."""
    x, w, b, c = _case((3, 24, 9, 8, 3, 5, 3), torch.float32, device, gen)
    want = _reference(x, w, b, c, 1, (1, 2), 1)
    xs = {
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "channel_stride_2": torch.stack([x, x], 2).flatten(1, 2)[:, ::2],
        "offset": torch.cat([x.new_zeros(1), x.flatten()])[1:].view_as(x),
    }
    ws = {
        "contiguous": w,
        "taps_then_channels": w.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2),
        "transposed_taps": w.transpose(3, 4).contiguous().transpose(3, 4),
    }
    for xn, xi in xs.items():
        for wn, wi in ws.items():
            for ci in (c, c.double(), torch.stack([c, c], 2).flatten(1)[:, ::2]):
                got = dawin_ext.samplewise_depthwise_conv2d(xi, wi, ci, b[:, :].t().contiguous().t(), 1, (1, 2))
                _close(got, want, torch.float32), (xn, wn)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_one_source(device, gen):
    x, w, b, c = _case((0, 5, 6, 6, 3, 3, 2), torch.float32, device, gen)
    assert dawin_ext.samplewise_depthwise_conv2d(x, w, c, b, 1, 1).shape == (0, 5, 6, 6)
    x, w, b, _ = _case((2, 5, 6, 6, 3, 3, 1), torch.float32, device, gen)
    got = dawin_ext.samplewise_depthwise_conv2d(x, w, torch.ones(2, 1, device=device), b, 1, 1)
    want = torch.nn.functional.conv2d(x, w[0], b[0], 1, 1, 1, 5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_sample_and_inputs_not_mutated(device, gen):
    x, w, b, c = _case((3, 6, 5, 5, 3, 3, 2), torch.float32, device, gen)
    x[1, 2, 2, 2] = float("nan")
    c[2, 0] = float("nan")
    before = [t.clone() for t in (x, w, b, c)]
    got = dawin_ext.samplewise_depthwise_conv2d(x, w, c, b, 1, 1)
    assert torch.isfinite(got[0]).all()
    assert torch.isnan(got[1, 2]).any() and torch.isfinite(got[1, [0, 1, 3, 4, 5]]).all()  # one channel only
    assert torch.isnan(got[2]).all()
    for t0, t in zip(before, (x, w, b, c), strict=True):
        assert torch.equal(t0.nan_to_num(), t.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_problem(device, gen):
    x, w, b, c = _case((2, 4, 5, 5, 3, 3, 2), torch.float32, device, gen)
    f = dawin_ext.samplewise_depthwise_conv2d
    with pytest.raises(ValueError, match=r"input must be \[B, C, H, W\]"):
        f(x[0], w, c, b)
    with pytest.raises(ValueError, match=r"weights must be \[S sources, C, 1, KH, KW\]"):
        f(x, w[0], c, b)
    with pytest.raises(ValueError, match="weights have 3 channels but input has 4"):
        f(x, w[:, :3], c, b)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        f(x.double(), w.double(), c, b.double())
    with pytest.raises(TypeError, match="weights are Half but input is Float"):
        f(x, w.half(), c, b)
    with pytest.raises(ValueError, match=r"coefficients must be \[B, S\] = \[2, 2\]"):
        f(x, w, c[:, :1], b)
    with pytest.raises(TypeError, match="coefficients must be floating point"):
        f(x, w, c.long(), b)
    with pytest.raises(ValueError, match=r"biases must be \[S, C\] = \[2, 4\]"):
        f(x, w, c, b[:, :3])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        f(x, w, c, b, stride=0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        f(x, w, c, b, padding=(-1, 0))
    with pytest.raises(ValueError, match="stride must be an int or 2 ints"):
        f(x, w, c, b, stride=(1, 1, 1))
    with pytest.raises(ValueError, match=r"padded input \(5 x 5\) is smaller than the dilated kernel \(7 x 7\)"):
        f(x, w, c, b, dilation=3)
    with pytest.raises(RuntimeError, match="has no backward"):
        f(x.clone().requires_grad_(True), w, c, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    x, w, b, c = _case((2, 5, 6, 7, 3, 3, 3), torch.float32, device, gen)
    torch.library.opcheck(op.default, (x, w, b, c, [1, 2], [1, 0], [2, 1]))
    torch.library.opcheck(op.default, (x.half(), w.half(), None, c, [1, 1], [1, 1], [1, 1]))
