"""samplewise_conv against per-sample merging: every route, 1-d/2-d/3-d, dense, grouped and depthwise kernels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dawin_ext.exact.conv import (
    MAX_PER_SAMPLE_WEIGHT_NUMEL,
    ROUTES,
    samplewise_conv,
    samplewise_conv_route,
    samplewise_conv_weights,
)

_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _reference(x, weights, coefficients, biases, stride, padding, dilation, groups, padding_mode="zeros"):
    """Per-sample merging in float64: merge the S sources with sample b's row, run the stock nn.ConvNd on x[b]."""
    n = weights.dim() - 3
    s, c_out = weights.shape[0], weights.shape[1]
    conv = _CONV_MODULES[n](
        x.shape[1],
        c_out,
        tuple(weights.shape[3:]),
        stride,
        padding,
        dilation,
        groups,
        biases is not None,
        padding_mode,
        dtype=torch.float64,
    )
    outs = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            row = coefficients[b].double()
            conv.weight.copy_(sum(row[i] * weights[i].double() for i in range(s)))
            if biases is not None:
                conv.bias.copy_(sum(row[i] * biases[i].double() for i in range(s)))
            outs.append(conv(x[b : b + 1].double()))
    if not outs:
        return None
    return torch.cat(outs)


def _case(gen, n, batch, c_in, c_out, groups, kernel, spatial, num_sources, bias=True, dtype=torch.float32):
    x = torch.randn(batch, c_in, *spatial, generator=gen).to(dtype)
    w = (torch.randn(num_sources, c_out, c_in // groups, *kernel, generator=gen) / math.sqrt(c_in)).to(dtype)
    c = torch.rand(batch, num_sources, generator=gen) * 2 - 0.5  # rows need not sum to 1, may be negative
    b = torch.randn(num_sources, c_out, generator=gen).to(dtype) if bias else None
    return x, w, c, b


def _check(y, ref, tol):
    assert y.shape == ref.shape, (y.shape, ref.shape)
    scale = ref.abs().max().item() or 1.0
    err = (y.double() - ref).abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} at output scale {scale:.3g} (tol {tol:g} relative)"


# (stride, padding, dilation, padding_mode) cases; kernel sizes per test are odd and even.
_GEOMETRIES = [
    (1, 0, 1, "zeros"),
    (2, 1, 1, "zeros"),
    (1, "same", 2, "zeros"),
    (3, "valid", 1, "zeros"),
    ((2, 1, 3), (1, 0, 2), (1, 2, 1), "zeros"),
    (1, 2, 1, "reflect"),
    (2, 1, 1, "replicate"),
    (1, "same", 1, "circular"),
]
# (c_in, c_out, groups): dense, grouped, depthwise, depthwise with a channel multiplier
_CHANNELS = [(5, 7, 1), (6, 4, 2), (6, 6, 6), (3, 6, 3)]


def _skip_unless_route_applies(route, n, c_in, c_out, groups, dtype=torch.float32):
    """The "linear" route takes dense fp32/fp16/bf16 convolutions, "depthwise" 2-D depthwise ones (same dtypes)."""
    if route == "linear" and (groups > 1 or dtype == torch.float64):
        pytest.skip("linear route: dense fp32/fp16/bf16 only (samplewise_linear computes in fp32)")
    if route == "depthwise" and not (n == 2 and c_in == c_out == groups and dtype != torch.float64):
        pytest.skip("depthwise route: 2-D depthwise fp32/fp16/bf16 only (samplewise_depthwise_conv2d)")


def _geometry(g, n):
    def per_dim(v):
        return tuple(v[:n]) if isinstance(v, tuple) else v

    stride, padding, dilation, mode = g
    return per_dim(stride), per_dim(padding), per_dim(dilation), mode


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("channels", _CHANNELS, ids=lambda c: f"cin{c[0]}-cout{c[1]}-g{c[2]}")
@pytest.mark.parametrize("route", ["auto", *ROUTES])
def test_matches_per_sample_merging(gen, n, channels, route):
    c_in, c_out, groups = channels
    _skip_unless_route_applies(route, n, c_in, c_out, groups)
    kernel = (3, 2, 3)[:n]
    spatial = (11, 9, 7)[:n]
    for gi, geom in enumerate(_GEOMETRIES):
        stride, padding, dilation, mode = _geometry(geom, n)
        num_sources = 1 + gi % 4  # S = 1..4
        x, w, c, b = _case(gen, n, 3, c_in, c_out, groups, kernel, spatial, num_sources, bias=gi % 3 != 2)
        with torch.no_grad():
            y = samplewise_conv(x, w, c, b, stride, padding, dilation, groups, mode, route=route)
        ref = _reference(x, w, c, b, stride, padding, dilation, groups, mode)
        _check(y, ref, 1e-5)
        assert y.dtype == torch.float32


@pytest.mark.parametrize("route", ["auto", *ROUTES])
@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_batches(gen, route, batch):
    c_in, c_out, groups = (5, 5, 5) if route == "depthwise" else (4, 5, 1)
    x, w, c, b = _case(gen, 2, batch, c_in, c_out, groups, (3, 3), (6, 5), 2)
    with torch.no_grad():
        y = samplewise_conv(x, w, c, b, 1, 1, groups=groups, route=route)
    assert y.shape == (batch, 5, 6, 5)
    if batch:
        _check(y, _reference(x, w, c, b, 1, 1, 1, groups), 1e-5)


@pytest.mark.parametrize("route", ["auto", *ROUTES])
def test_non_contiguous_inputs_and_weight_layouts(gen, route):
    c_in, c_out, groups = (6, 6, 6) if route == "depthwise" else (6, 8, 1)
    x, w, c, b = _case(gen, 2, 4, c_in, c_out, groups, (3, 3), (9, 10), 3)
    ref = _reference(x, w, c, b, 2, 1, 1, groups)
    xs = [
        x.contiguous(memory_format=torch.channels_last),
        x.transpose(2, 3).contiguous().transpose(2, 3),  # spatial dims swapped in memory
        torch.stack([x, x], 2).flatten(1, 2)[:, ::2],  # channel stride 2
    ]
    ws = [
        w,
        w.permute(0, 3, 4, 2, 1).contiguous().permute(0, 4, 3, 1, 2),
        w.transpose(3, 4).contiguous().transpose(3, 4),
    ]
    cs = [c, torch.stack([c, c], 2).flatten(1)[:, ::2]]  # column stride 2
    for xi in xs:
        for wi in ws:
            for ci in cs:
                before = [t.clone() for t in (xi, wi, ci, b)]
                with torch.no_grad():
                    y = samplewise_conv(xi, wi, ci, b, 2, 1, groups=groups, route=route)
                _check(y, ref, 1e-5)
                for t0, t in zip(before, (xi, wi, ci, b), strict=True):
                    assert torch.equal(t0, t), "samplewise_conv modified an input"


def test_samplewise_conv_weights_layout(gen):
    w = torch.randn(3, 8, 5, 1, 1, generator=gen)
    fast = samplewise_conv_weights(list(w))
    assert torch.equal(fast, w)
    # 1x1: [S, C_in, C_out] storage, which the linear route reads as [S, K, C_out] without a copy
    flat = fast.permute(0, 3, 4, 2, 1).reshape(3, -1, 8)
    assert flat.data_ptr() == fast.data_ptr() and flat.stride(2) == 1
    # other kernels: plain contiguous (the stacked route's free [S*C_out, ...] view)
    w3 = torch.randn(2, 4, 5, 3, 3, generator=gen).transpose(3, 4)
    fast3 = samplewise_conv_weights(w3)
    assert torch.equal(fast3, w3) and fast3.is_contiguous()


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float16, 4e-3), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)], ids=str
)
@pytest.mark.parametrize("route", ["auto", *ROUTES])
@pytest.mark.parametrize("channels", [(8, 12, 1), (8, 8, 8)], ids=["dense", "depthwise"])
def test_other_dtypes(gen, dtype, tol, route, channels):
    c_in, c_out, groups = channels
    _skip_unless_route_applies(route, 2, c_in, c_out, groups, dtype)
    x, w, c, b = _case(gen, 2, 3, c_in, c_out, groups, (3, 3), (7, 6), 2, dtype=dtype)
    with torch.no_grad():
        y = samplewise_conv(x, w, c, b, 1, "same", groups=groups, route=route)
    assert y.dtype == dtype
    # The reference merges the low-precision sources exactly (float64); per-sample merging in the low dtype would
    # round the merged weight once more, so the bound is about one rounding of the output.
    _check(y, _reference(x, w, c, b, 1, "same", 1, groups), tol)


def test_linear_route_refuses_float64(gen):
    x, w, c, b = _case(gen, 2, 2, 4, 4, 1, (3, 3), (5, 5), 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="route 'linear' computes in float32"):
        samplewise_conv(x, w, c, b, route="linear")


@pytest.mark.parametrize("route", ["auto", "fold", "stacked"])
def test_autograd(gen, route):
    """Under autograd the fold and stacked routes (pure torch ops) give the reference's gradients."""
    x, w, c, b = _case(gen, 2, 3, 4, 6, 2, (3, 3), (6, 7), 2)
    x.requires_grad_(True)
    c.requires_grad_(True)
    y = samplewise_conv(x, w, c, b, 1, 1, groups=2, route=route)
    (gx, gc) = torch.autograd.grad((y * y).sum(), (x, c))
    x64, c64 = x.detach().double().requires_grad_(True), c.detach().double().requires_grad_(True)
    w_b = torch.einsum("bs,s...->b...", c64, w.double())
    b_b = c64 @ b.double()
    ref = torch.cat(
        [
            torch.nn.functional.conv2d(x64[i : i + 1], w_b[i], b_b[i], 1, 1, 1, 2)
            for i in range(x.shape[0])  # per sample, differentiable
        ]
    )
    (rx, rc) = torch.autograd.grad((ref * ref).sum(), (x64, c64))
    torch.testing.assert_close(gx.double(), rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gc.double(), rc, atol=1e-3, rtol=1e-4)


def test_linear_route_refuses_autograd(gen):
    x, w, c, b = _case(gen, 2, 2, 4, 4, 1, (3, 3), (5, 5), 2)
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        samplewise_conv(x, w, c, b, route="linear")


@pytest.mark.parametrize("route", ["auto", *ROUTES])
def test_nan_coefficients_poison_only_their_sample(gen, route):
    c_in, c_out, groups = (6, 6, 6) if route == "depthwise" else (4, 6, 1)
    x, w, c, b = _case(gen, 2, 3, c_in, c_out, groups, (3, 3), (8, 8), 2)
    c[1, 0] = float("nan")
    with torch.no_grad():
        y = samplewise_conv(x, w, c, b, 1, 1, groups=groups, route=route)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


def test_errors_name_the_problem(gen):
    x, w, c, b = _case(gen, 2, 3, 4, 6, 1, (3, 3), (8, 8), 2)
    with pytest.raises(ValueError, match=r"coefficients must be \[B, S\] with S = 2"):
        samplewise_conv(x, w, c[:, :1], b)
    with pytest.raises(ValueError, match="x has batch 3 but coefficients have 2 rows"):
        samplewise_conv(x, w, c[:2], b)
    with pytest.raises(ValueError, match="groups = 4 must divide both C_in = 4.*C_out = 6"):
        samplewise_conv(x, w, c, b, groups=4)
    with pytest.raises(ValueError, match="expect C_in/groups = 4"):
        samplewise_conv(x[:, :2], w, c, b)
    with pytest.raises(ValueError, match="so x must be"):
        samplewise_conv(x[0], w, c, b)
    with pytest.raises(ValueError, match="weights must be"):
        samplewise_conv(x, w[0, 0], c, b)
    with pytest.raises(ValueError, match=r"biases must be \[S, C_out\] = \[2, 6\]"):
        samplewise_conv(x, w, c, b[:, :5])
    with pytest.raises(TypeError, match="weights have dtype torch.float64 but x has torch.float32"):
        samplewise_conv(x, w.double(), c, b)
    with pytest.raises(ValueError, match="'same' is not supported for strided"):
        samplewise_conv(x, w, c, b, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be 'same', 'valid'"):
        samplewise_conv(x, w, c, b, padding="full")
    with pytest.raises(ValueError, match="stride must have 2 entries"):
        samplewise_conv(x, w, c, b, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        samplewise_conv(x, w, c, b, padding_mode="mirror")
    with pytest.raises(ValueError, match="route 'linear' needs groups == 1"):
        samplewise_conv(x, w[:, :, :2], c, b, groups=2, route="linear")
    with pytest.raises(ValueError, match=r"route 'depthwise' needs a 2-D depthwise convolution.*groups = 1"):
        samplewise_conv(x, w, c, b, route="depthwise")
    xd, wd, cd, bd = _case(gen, 2, 2, 4, 4, 4, (3, 3), (5, 5), 2)
    with pytest.raises(TypeError, match="route 'depthwise' takes float32, float16 or bfloat16"):
        samplewise_conv(xd.double(), wd.double(), cd, bd.double(), groups=4, route="depthwise")
    with pytest.raises(RuntimeError, match="route 'depthwise' has no backward"):
        samplewise_conv(xd.requires_grad_(True), wd, cd, bd, groups=4, route="depthwise")
    with pytest.raises(ValueError, match="does not fit the padded input"):
        samplewise_conv(x[..., :2, :2], w, c, b)
    with pytest.raises(ValueError, match="route must be 'auto' or one of"):
        samplewise_conv(x, w, c, b, route="im2col")
    big = torch.zeros(1, 1025, 1024, 1, 1)
    with pytest.raises(ValueError, match="has 1049600 entries, over the 1048576 budget"):
        samplewise_conv(torch.zeros(1, 1024, 1, 1), big, torch.ones(1, 1), route="fold")
    with pytest.raises(TypeError, match="coefficients must be floating point"):
        samplewise_conv(x, w, c.long(), b)


def test_auto_route_follows_the_documented_rule():
    cpu, f32 = "cpu", torch.float32
    # 2-D depthwise on the CPU (fp32/fp16/bf16, no autograd): the depthwise kernel, whatever the map size
    for dtype in (f32, torch.float16, torch.bfloat16):
        for p in (4, 16, 64, 256):
            assert samplewise_conv_route((2, 160, 1, 7, 7), p, 160, dtype, cpu) == "depthwise"
    assert samplewise_conv_route((2, 6, 1, 7, 7), 4, 3, f32, cpu) != "depthwise"  # channel multiplier 2
    assert samplewise_conv_route((2, 6, 1, 3), 4, 6, f32, cpu) != "depthwise"  # 1-D
    # depthwise elsewhere, and grouped: fold while one sample's weight is small and the map is not tiny, never
    # above the 1M-entry budget; one convolution per source on tiny maps
    for kw in ({"dtype": f32, "device": "cuda"}, {"dtype": torch.float64, "device": cpu}):
        assert samplewise_conv_route((2, 160, 1, 7, 7), 64, 160, **kw) == "fold"
        assert samplewise_conv_route((2, 160, 1, 7, 7), 16, 160, **kw) == "stacked"
    assert samplewise_conv_route((2, 160, 1, 7, 7), 64, 160, f32, cpu, needs_grad=True) == "fold"
    assert samplewise_conv_route((2, 160, 2, 7, 7), 64, 80, f32, cpu) == "fold"
    assert samplewise_conv_route((2, 4096, 512, 1, 1), 16, 2, f32, cpu) == "stacked"
    # dense convolutions never fold above the budget, whatever the device or dtype
    for dtype in (torch.float32, torch.float16, torch.float64):
        for device in ("cpu", "cuda", "meta"):
            for p in (1, 4, 64, 4096):
                shape = (2, 1025, 1024, 1, 1)
                assert math.prod(shape[1:]) > MAX_PER_SAMPLE_WEIGHT_NUMEL
                assert samplewise_conv_route(shape, p, 1, dtype, device) != "fold"
                assert samplewise_conv_route(shape, p, 1, dtype, device, needs_grad=True) != "fold"
    # off the linear route: stacked under autograd for tiny outputs
    assert samplewise_conv_route((2, 64, 64, 3, 3), 4, 1, f32, cpu, needs_grad=True) == "stacked"
    assert samplewise_conv_route((2, 64, 64, 3, 3), 256, 1, f32, cpu, needs_grad=True) == "fold"


@pytest.mark.skipif(
    __import__("dawin_ext").ops.samplewise_linear_cpu_path() != "brgemm", reason="samplewise_linear lacks brgemm"
)
def test_auto_route_linear_where_mixing_in_cache_pays():
    cpu, f32 = "cpu", torch.float32
    assert samplewise_conv_route((2, 640, 160, 1, 1), 16, 1, f32, cpu) == "linear"  # block fits L2
    assert samplewise_conv_route((2, 256, 256, 3, 3), 16, 1, f32, cpu) == "stacked"  # S*K = 4608: re-read per sample
    assert samplewise_conv_route((2, 768, 3, 32, 32), 49, 1, f32, cpu) == "linear"  # ViT-B-32's patch embedding
    assert samplewise_conv_route((2, 128, 128, 3, 3), 64, 1, f32, cpu) == "linear"
    assert samplewise_conv_route((1, 128, 128, 3, 3), 16, 1, f32, cpu) == "stacked"  # S = 1: nothing to mix
    assert samplewise_conv_route((2, 320, 1280, 1, 1), 4, 1, f32, cpu) == "linear"  # 1x1: no im2col
    assert samplewise_conv_route((2, 64, 3, 7, 7), 1024, 1, f32, cpu) == "linear"  # RGB stem: too few channels
    assert samplewise_conv_route((2, 512, 512, 3, 3), 4, 1, f32, cpu) == "stacked"
    assert samplewise_conv_route((2, 64, 64, 3, 3), 256, 1, f32, cpu) == "fold"  # large outputs, small weight
    assert samplewise_conv_route((2, 1025, 1024, 3, 3), 4096, 1, f32, cpu) == "linear"  # over the copy budget
    assert samplewise_conv_route((2, 128, 128, 3, 3), 64, 1, torch.bfloat16, cpu) == "fold"


@pytest.mark.parametrize("route", ["auto", *ROUTES])
@pytest.mark.parametrize(
    ("spatial", "kernel", "stride", "padding", "dilation", "groups"),
    [
        ((2, 2), (7, 7), 1, 3, 1, 8),  # convnext's last stage at 64x64: only the central 3x3 taps see data
        ((2, 3), (7, 5), 1, (3, 2), 1, 1),
        ((1, 4), (5, 5), 2, 2, 1, 2),
        ((3, 2), (5, 7), 1, (4, 6), 2, 8),
        ((2, 2), (6, 6), 1, 3, 1, 1),  # even kernel: the reachable taps are not centred
    ],
)
def test_taps_reading_only_padding(gen, route, spatial, kernel, stride, padding, dilation, groups):
    """Kernels much larger than the input: the taps that only see zero padding are dropped, the result is unchanged."""
    _skip_unless_route_applies(route, 2, 8, 8, groups)
    x, w, c, b = _case(gen, 2, 3, 8, 8, groups, kernel, spatial, 2)
    with torch.no_grad():
        y = samplewise_conv(x, w, c, b, stride, padding, dilation, groups, route=route)
    _check(y, _reference(x, w, c, b, stride, padding, dilation, groups), 1e-5)
