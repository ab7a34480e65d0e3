"""Exact per-sample convolutions: sample ``b`` is convolved with ``sum_s c[b, s] * W_s``.

:func:`samplewise_conv` is a plain batched function (no module state) for 1-d, 2-d and 3-d convolutions, dense,
grouped and depthwise. It is the convolution kernel of the exact per-sample interpolation engine: the engine hands it
the S sources' weights of one convolution layer and the batch's coefficient rows, and gets back what merging the
weights for every sample and running the stock convolution on that sample would give, up to rounding.

Routes (all exact, they differ in cost only):

* ``"fold"``: per-sample weights ``[B, C_out, C_in/groups, *k]`` are formed (S multiply-adds per entry in fp32,
  rounded once to the input dtype, as per-sample merging does) and the batch is folded into channels: one grouped
  convolution of the input viewed as ``[1, B*C_in, ...]`` with ``groups = B*groups``. One convolution's FLOPs plus
  ``B*S*numel`` for the weights. The natural route for depthwise and grouped convolutions, whose weights are small.
* ``"stacked"``: one convolution with the S sources' weights stacked along the output channels, giving S partial
  outputs side by side, then the per-sample combination ``sum_s c[b, s] y_s`` in one pass
  (:func:`dawin_ext.sample_combine`, fp32 accumulation); grouped convolutions run one stock convolution per source
  and combine the same way. S times the FLOPs, but no per-sample weights at all.
* ``"linear"`` (``groups == 1``, no autograd): the convolution as a linear map of its patches. A 1x1 convolution reads
  the input channels-last directly; any other kernel first gathers its patches ``[B, L, C_in*prod(k)]`` (im2col).
  :func:`dawin_ext.samplewise_linear` then mixes each sample's weights block by block in cache (CPU, fp32, >= 10
  output positions per sample: about one GEMM's cost; below that one GEMM over the sources' concatenated inputs,
  S times the FLOPs; elsewhere S GEMMs blended per sample). Its result is
  returned as a channels-last strided view ``[B, C_out, *spatial_out]`` (no copy back).
* ``"depthwise"`` (2-D, ``groups == C_in == C_out``, float32/float16/bfloat16, no autograd):
  :func:`dawin_ext.samplewise_depthwise_conv2d`, one kernel that mixes each sample's taps into a small fp32 table
  (``B * (prod(k) + 1) * C`` entries) and convolves a channels-last input with it in the same call: one
  convolution's FLOPs, one read of the input, no stacked outputs and no per-sample weight tensor.

Calling it from a vmap rule: move the batch dim of ``x`` to 0 (fold any extra leading dims into it, repeating the
coefficient rows), pass the layer's S stacked sources built once with :func:`samplewise_conv_weights` (raw sources
with rows ``c``, or ``[W0, W_a - W0, ...]`` with rows ``[1, c_a, ...]``: both are exact, the second drops sources
equal to source 0), ``coefficients`` ``[B, S]`` and the layer's own stride/padding/dilation/groups. Non-zero padding
modes are applied by ``nn.Conv*d`` itself through ``F.pad`` before ``F.conv*d``, so a caller that intercepts
``F.conv*d`` passes ``padding_mode="zeros"``. Under autograd only ``"fold"`` and ``"stacked"`` are taken.

Kernel taps that only ever read zero padding (a 7x7 kernel with padding 3 on a 2x2 map) are dropped first, with the
padding shrunk to match; the output is unchanged and oneDNN's depthwise kernel was ~20x slower on the uncropped shape.

Memory rule: a per-sample copy of a weight tensor (the ``"fold"`` route's ``[B, C_out, C_in/groups, *k]``) is made
only when one sample's weight has at most :data:`MAX_PER_SAMPLE_WEIGHT_NUMEL` (1M) entries, and only when the
heuristic below picks that route. ``"stacked"`` and ``"linear"`` never copy weights per sample.

Heuristic (``route="auto"``, :func:`samplewise_conv_route`), fitted to the layer shapes of timm's convnext_atto and
resnet18 at batch 16 (``benchmarks/test_bench_samplewise_conv.py``). With ``P`` the output positions per sample,
``K = C_in/groups * prod(k)`` and ``n = C_out * K`` one sample's weight entries:

0. 2-D depthwise (``[S, C, 1, KH, KW]``, ``groups == C``) on the CPU in float32/float16/bfloat16 without autograd:
   ``"depthwise"`` (convnext_atto's 7x7 layers at batch 16: 1.5-4x faster than the route below;
   ``benchmarks/depthwise_routes.py``);
1. grouped or depthwise (``groups > 1``): ``"fold"`` if ``n <= 1M`` and ``P >= 32``, else ``"stacked"`` (one stock
   convolution per source);
2. dense on the CPU in float32 without autograd: ``"linear"`` for 1x1 kernels (no im2col; in a channels-last
   network such as timm's ConvNeXt the input is already the GEMM operand); ``"fold"`` if ``n <= 1M``, ``P >= 256``
   and ``C_in >= 16`` (forming the weights is then negligible and the convolution library beats im2col); else
   ``"linear"`` when forming each sample's weights in cache costs less than the stacked convolution's extra
   ``(S - 1)`` GEMMs (``P * (S - 1) >= a * S``, ``a`` = 2 when the sources' weight block fits in L2,
   ``S * K <= 2048``, else 24), otherwise ``"stacked"``;
3. elsewhere (CUDA, half precision, float64, autograd: not measured yet): ``"fold"`` if ``n <= 1M`` and ``P >= 64``,
   else ``"stacked"``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import sample_combine, samplewise_depthwise_conv2d, samplewise_linear, samplewise_linear_cpu_path

__all__ = [
    "samplewise_conv",
    "samplewise_conv_route",
    "samplewise_conv_weights",
    "samplewise_conv_plan",
    "ConvPlan",
    "ROUTES",
    "MAX_PER_SAMPLE_WEIGHT_NUMEL",
]

#: Routes :func:`samplewise_conv` can take; ``"auto"`` picks one per call.
ROUTES = ("fold", "stacked", "linear", "depthwise")
_DEPTHWISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Largest per-sample weight (entries of one ``[C_out, C_in/groups, *k]`` tensor) that may be copied per sample.
MAX_PER_SAMPLE_WEIGHT_NUMEL = 1 << 20
# Cost of forming one sample's merged weight entry, in units of one multiply-add of the GEMM, when the sources'
# [S, K, 64] block that samplewise_linear mixes stays in L2 across samples (S * K <= _L2_BLOCK_SK: 512 KiB of fp32)
# and when it does not (read again from L3/memory for every sample). Fitted to the convnext_atto/resnet18 layer
# shapes at batch 16 (benchmarks/test_bench_samplewise_conv.py) and to ViT-B-32's patch embedding (K = 3072,
# P = 49, batch 64: "linear" 1.4x a plain convolution, "stacked" 2.5x), which 32 sent to "stacked".
_MIX_COST_IN_CACHE = 2
_MIX_COST_OUT_OF_CACHE = 24
_L2_BLOCK_SK = 2048
# Grouped and depthwise convolutions fold the batch from this many output positions per sample; below it, one
# stock convolution per source is cheaper than the folded call's fixed cost (convnext_atto's 7x7 depthwise layers
# on 4x4 and 2x2 maps: about half the time; on 8x8 maps folding won).
_FOLD_MIN_POSITIONS_GROUPED = 32
# Off the "linear" route, dense convolutions fold the batch only with this many output positions per sample or more.
_FOLD_MIN_POSITIONS = 64
# On the CPU in float32, dense k x k (k > 1) convolutions with a small weight fold the batch from this many output
# positions per sample: forming the weights is then negligible and the convolution library beats im2col +
# samplewise_linear (resnet18's 64-channel 3x3 layers); at 64 positions it does not.
_FOLD_MIN_POSITIONS_CPU = 256
# ... and at least this many input channels per group: with fewer (an RGB stem) im2col + samplewise_linear won.
_FOLD_MIN_CHANNELS_CPU = 16
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    try:
        t = tuple(int(v) for v in value)
    except TypeError as exc:
        raise TypeError(f"samplewise_conv: {name} must be an int or a sequence of {n} ints, got {value!r}") from exc
    if len(t) == 1:
        return t * n
    if len(t) != n:
        raise ValueError(f"samplewise_conv: {name} must have {n} entries for a {n}-d convolution, got {value!r}")
    return t


def _pads(
    padding: str | int | Sequence[int], kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> list[tuple[int, int]]:
    """Explicit (before, after) padding per spatial dim, with torch's convention for ``"same"`` (extra on the right)."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * n
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    f"samplewise_conv: padding='same' is not supported for strided convolutions ({stride})"
                )
            pads = []
            for k, d in zip(kernel, dilation, strict=True):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return pads
        raise ValueError(f"samplewise_conv: padding must be 'same', 'valid', an int or {n} ints, got {padding!r}")
    p = _tuple(padding, n, "padding")
    if any(v < 0 for v in p):
        raise ValueError(f"samplewise_conv: padding must be non-negative, got {padding!r}")
    return [(v, v) for v in p]


def _check_coefficients(x: Tensor, s: int, coefficients: Tensor) -> None:
    if coefficients.dim() != 2 or coefficients.shape[1] != s:
        raise ValueError(
            f"samplewise_conv: coefficients must be [B, S] with S = {s} (weights' first dim), "
            f"got shape {tuple(coefficients.shape)}"
        )
    if coefficients.shape[0] != x.shape[0]:
        raise ValueError(
            f"samplewise_conv: x has batch {x.shape[0]} but coefficients have {coefficients.shape[0]} rows; "
            "one coefficient row per sample"
        )
    if not coefficients.is_floating_point():
        raise TypeError(f"samplewise_conv: coefficients must be floating point, got {coefficients.dtype}")


def _check_args(x: Tensor, weights: Tensor, coefficients: Tensor | None, biases: Tensor | None, groups: int) -> int:
    """Validates shapes, dtypes and devices (the coefficients' too unless None); returns the number of spatial dims."""
    for name, t in (("x", x), ("weights", weights), ("coefficients", coefficients), ("biases", biases)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"samplewise_conv: {name} must be a Tensor, got {type(t).__name__}")
    if weights.dim() not in (4, 5, 6):
        raise ValueError(
            "samplewise_conv: weights must be [S, C_out, C_in/groups, *kernel] with a 1-, 2- or 3-d kernel "
            f"(4 to 6 dims), got shape {tuple(weights.shape)}"
        )
    n = weights.dim() - 3
    if x.dim() != n + 2:
        raise ValueError(
            f"samplewise_conv: weights {tuple(weights.shape)} are for a {n}-d convolution, so x must be "
            f"[B, C_in, *spatial] with {n + 2} dims, got shape {tuple(x.shape)}"
        )
    s, c_out, c_in_g = weights.shape[0], weights.shape[1], weights.shape[2]
    if s < 1:
        raise ValueError(f"samplewise_conv: weights have S = 0 sources (shape {tuple(weights.shape)})")
    if coefficients is not None:
        _check_coefficients(x, s, coefficients)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"samplewise_conv: groups must be a positive int, got {groups!r}")
    c_in = x.shape[1]
    if c_in % groups or c_out % groups:
        raise ValueError(
            f"samplewise_conv: groups = {groups} must divide both C_in = {c_in} (x's dim 1) and "
            f"C_out = {c_out} (weights' dim 1)"
        )
    if c_in_g * groups != c_in:
        raise ValueError(
            f"samplewise_conv: weights {tuple(weights.shape)} expect C_in/groups = {c_in_g}, but x has "
            f"C_in = {c_in} with groups = {groups} ({c_in // groups} per group)"
        )
    if biases is not None and tuple(biases.shape) != (s, c_out):
        raise ValueError(
            f"samplewise_conv: biases must be [S, C_out] = [{s}, {c_out}], got shape {tuple(biases.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"samplewise_conv: x must be floating point, got {x.dtype}")
    for name, t in (("weights", weights), ("biases", biases)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"samplewise_conv: {name} have dtype {t.dtype} but x has {x.dtype}; they must match")
    for name, t in (("weights", weights), ("coefficients", coefficients), ("biases", biases)):
        if t is not None and t.device != x.device:
            raise ValueError(f"samplewise_conv: {name} are on {t.device} but x is on {x.device}")
    return n


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _out_size(size: int, pad: tuple[int, int], k: int, s: int, d: int) -> int:
    return (size + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1


def samplewise_conv_route(
    weight_shape: Sequence[int],
    out_positions: int,
    groups: int,
    dtype: torch.dtype,
    device: torch.device | str,
    needs_grad: bool = False,
) -> str:
    """The route ``route="auto"`` takes for a ``[S, C_out, C_in/groups, *k]`` weight and ``out_positions`` outputs.

    The rule (see the module docstring; thresholds from ``benchmarks/test_bench_samplewise_conv.py``):

    0. a 2-D depthwise weight (``[S, C, 1, KH, KW]``, ``groups == C``) on the CPU, float32/float16/bfloat16, no
       autograd: ``"depthwise"`` (CUDA keeps the rules below until a GPU has measured the kernel).
    1. ``groups > 1``: ``"fold"`` when one sample's weight has at most 1M entries and ``P >= 32``, else
       ``"stacked"``.
    2. ``groups == 1``, CPU, float32, no autograd, samplewise_linear's brgemm path present: ``"linear"`` for 1x1
       kernels; ``"fold"`` when one sample's weight has at most 1M entries, ``P >= 256`` and ``C_in >= 16``; else
       ``"linear"`` when ``P * (S - 1) >= a * S``, else ``"stacked"``. ``a`` is 2 if the sources' ``[S, K, 64]``
       weight block (``K = C_in * prod(k)``) that samplewise_linear mixes fits in L2 (``S * K <= 2048``) and 24 if
       it does not. The form follows the costs (forming a sample's weights ~ ``S`` per weight entry, the stacked
       convolution's extra ``(S - 1) * P``); the constants are fitted to the measured routes, not derived.
    3. otherwise (CUDA, float16/bfloat16/float64, autograd; not measured): ``"fold"`` when one sample's weight has
       at most 1M entries and ``P >= 64``, else ``"stacked"``.
    """
    s = int(weight_shape[0])
    numel = math.prod(weight_shape[1:])
    small = numel <= MAX_PER_SAMPLE_WEIGHT_NUMEL
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and _is_depthwise_2d(weight_shape, groups) and dtype in _DEPTHWISE_DTYPES and not needs_grad:
        return "depthwise"  # CUDA: the rules below until a GPU has measured the kernel
    if groups > 1:
        return "fold" if small and out_positions >= _FOLD_MIN_POSITIONS_GROUPED else "stacked"
    if (
        not needs_grad
        and torch.device(device).type == "cpu"
        and dtype == torch.float32
        and samplewise_linear_cpu_path() == "brgemm"
    ):
        if all(k == 1 for k in weight_shape[3:]):
            return "linear"  # no im2col: a channels-last view of the input is the GEMM's operand
        if small and out_positions >= _FOLD_MIN_POSITIONS_CPU and weight_shape[2] >= _FOLD_MIN_CHANNELS_CPU:
            return "fold"
        k = math.prod(weight_shape[2:])
        a = _MIX_COST_IN_CACHE if s * k <= _L2_BLOCK_SK else _MIX_COST_OUT_OF_CACHE
        return "linear" if out_positions * (s - 1) >= a * s else "stacked"
    return "fold" if small and out_positions >= _FOLD_MIN_POSITIONS else "stacked"


def _is_depthwise_2d(weight_shape: Sequence[int], groups: int) -> bool:
    """A 2-D ``[S, C, 1, KH, KW]`` weight with ``groups == C``: what samplewise_depthwise_conv2d computes."""
    return len(weight_shape) == 5 and int(weight_shape[2]) == 1 and int(weight_shape[1]) == groups


def samplewise_conv(
    x: Tensor,
    weights: Tensor,
    coefficients: Tensor,
    biases: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    route: str = "auto",
) -> Tensor:
    """Per-sample interpolated convolution: sample ``b`` uses weight ``sum_s c[b, s] W_s``, bias ``sum_s c[b, s] b_s``.

    Equals, for every ``b``, ``F.conv{n}d(x[b:b+1], W(c_b), bias(c_b), stride, padding, dilation, groups)`` (after
    padding ``x`` with ``padding_mode`` as ``nn.Conv{n}d`` does), up to rounding, without forming any per-sample weight
    above 1M entries (see the module docstring for the routes and the rule that picks one).

    Args:
        x: ``[B, C_in, *spatial]`` with 1, 2 or 3 spatial dims (any strides; not modified).
        weights: ``[S, C_out, C_in/groups, *kernel]``: the S sources' weights, stacked; same dtype and device as x.
        coefficients: ``[B, S]`` floating point: one row per sample (need not sum to 1).
        biases: ``[S, C_out]`` or None.
        stride, padding, dilation, groups, padding_mode: as for ``nn.Conv{n}d``; padding may be an int, a tuple,
            ``"same"`` or ``"valid"``.
        route: ``"auto"`` or one of :data:`ROUTES` to force a route (for benchmarks and tests). ``"linear"`` needs
            ``groups == 1`` and no autograd.

    Returns:
        ``[B, C_out, *spatial_out]`` in x's dtype. The ``"linear"`` route returns a channels-last strided tensor.
    """
    if not isinstance(coefficients, Tensor):
        raise TypeError(f"samplewise_conv: coefficients must be a Tensor, got {type(coefficients).__name__}")
    plan = samplewise_conv_plan(
        x,
        weights,
        biases,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        route,
        _needs_grad(x, weights, coefficients, biases),
    )
    _check_coefficients(x, weights.shape[0], coefficients)
    if coefficients.device != x.device:
        raise ValueError(f"samplewise_conv: coefficients are on {coefficients.device} but x is on {x.device}")
    return plan(x, coefficients)


@dataclass(frozen=True)
class ConvPlan:
    """Everything :func:`samplewise_conv` decides from shapes alone (route, padding, tap crop, the weights in the
    layout the route reads), so that a caller that repeats a call (the exact engine, once per layer and input shape)
    pays for the decisions once. Call it as ``plan(x, coefficients)`` with an ``x`` of the shape, dtype and device
    it was made for."""

    route: str
    conv: Callable
    weights: Tensor  # cropped to the reachable taps; for "linear": the [S, C_out, prod(k) * C_in] view it reads
    biases: Tensor | None
    stride: tuple[int, ...]
    pad: tuple[int, ...]  # the convolution's own symmetric padding
    explicit_pad: tuple[int, ...] | None  # F.pad's argument when padding is applied first, else None
    pad_mode: str
    dilation: tuple[int, ...]
    groups: int
    c_out: int
    out_spatial: tuple[int, ...]
    kernel: tuple[int, ...]

    def __call__(self, x: Tensor, coefficients: Tensor) -> Tensor:
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad, mode=self.pad_mode)
        if x.shape[0] == 0:
            return x.new_empty((0, self.c_out, *self.out_spatial))
        args = (x, self.weights, coefficients, self.biases, self.stride, self.pad, self.dilation)
        if self.route == "linear":
            return _linear(*args, self.out_spatial, self.kernel)
        if self.route == "fold":
            return _fold(self.conv, *args, self.groups)
        if self.route == "depthwise":
            return samplewise_depthwise_conv2d(x, self.weights, coefficients, self.biases, *args[4:])
        return _stacked(self.conv, *args, self.groups)


def samplewise_conv_plan(
    x: Tensor,
    weights: Tensor,
    biases: Tensor | None,
    stride: int | Sequence[int],
    padding: str | int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    padding_mode: str = "zeros",
    route: str = "auto",
    needs_grad: bool = False,
) -> ConvPlan:
    """The :class:`ConvPlan` of :func:`samplewise_conv` for inputs of ``x``'s shape, dtype and device (arguments as
    there; ``x``'s values are not read). Validates the arguments that do not involve the coefficients."""
    n = _check_args(x, weights, None, biases, groups)
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"samplewise_conv: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    if route != "auto" and route not in ROUTES:
        raise ValueError(f"samplewise_conv: route must be 'auto' or one of {ROUTES}, got {route!r}")
    kernel = tuple(weights.shape[3:])
    stride_t = _tuple(stride, n, "stride")
    dilation_t = _tuple(dilation, n, "dilation")
    if any(v < 1 for v in stride_t) or any(v < 1 for v in dilation_t):
        raise ValueError(f"samplewise_conv: stride and dilation must be positive, got {stride!r}, {dilation!r}")
    pads = _pads(padding, kernel, stride_t, dilation_t)
    c_out = weights.shape[1]
    spatial = tuple(x.shape[2:])

    # Explicit padding first (nn.Conv's order for non-zero modes, and torch's for asymmetric 'same'), then the
    # convolution itself has none. Symmetric zero padding stays inside the convolution.
    explicit = None
    mode = "constant" if padding_mode == "zeros" else padding_mode
    if padding_mode != "zeros" or any(p0 != p1 for p0, p1 in pads):
        flat = tuple(v for p in reversed(pads) for v in p)
        if any(flat):
            explicit = flat
            spatial = tuple(size + p0 + p1 for size, (p0, p1) in zip(spatial, pads, strict=True))
        conv_pad = (0,) * n
    else:
        conv_pad = tuple(p0 for p0, _ in pads)
    out_spatial = tuple(
        _out_size(spatial[i], (conv_pad[i], conv_pad[i]), kernel[i], stride_t[i], dilation_t[i]) for i in range(n)
    )
    if any(o < 1 for o in out_spatial):
        raise ValueError(
            f"samplewise_conv: the kernel {kernel} (dilation {dilation_t}) does not fit the padded input "
            f"{spatial} with padding {conv_pad}: output size {out_spatial}"
        )
    if any(conv_pad):
        weights, conv_pad = _crop_to_reachable_taps(weights, spatial, conv_pad, stride_t, dilation_t, out_spatial)
    kernel = tuple(weights.shape[3:])

    if route == "auto":
        route = samplewise_conv_route(weights.shape, math.prod(out_spatial), groups, x.dtype, x.device, needs_grad)
    if route == "linear":
        if groups != 1:
            raise ValueError(f"samplewise_conv: route 'linear' needs groups == 1, got groups = {groups}")
        if needs_grad:
            raise RuntimeError(
                "samplewise_conv: route 'linear' has no backward; use 'fold' or 'stacked' under autograd"
            )
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"samplewise_conv: route 'linear' computes in float32 (samplewise_linear); x has {x.dtype}, "
                "use 'fold' or 'stacked'"
            )
        # [S, prod(k) * C_in, C_out] in (*k, C_in) order: a view for 1x1 weights in samplewise_conv_weights'
        # layout, else one copy, made once per plan rather than once per call.
        k = len(kernel)
        wt = weights.permute(0, *range(3, 3 + k), 2, 1).reshape(weights.shape[0], -1, c_out)
        weights = wt.transpose(1, 2)
    if route == "depthwise":
        if not _is_depthwise_2d(weights.shape, groups):
            raise ValueError(
                "samplewise_conv: route 'depthwise' needs a 2-D depthwise convolution (weights [S, C, 1, KH, KW] "
                f"with groups == C), got weights {tuple(weights.shape)} and groups = {groups}"
            )
        if needs_grad:
            raise RuntimeError(
                "samplewise_conv: route 'depthwise' has no backward; use 'fold' or 'stacked' under autograd"
            )
        if x.dtype not in _DEPTHWISE_DTYPES:
            raise TypeError(
                f"samplewise_conv: route 'depthwise' takes float32, float16 or bfloat16; x has {x.dtype}, "
                "use 'fold' or 'stacked'"
            )
        # Stored [S, KH, KW, C, 1] (a view with the usual shape): the kernel's mix reads each tap's C channels as
        # one contiguous row, so this copy is made once per plan instead of once per call.
        weights = weights.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    if route == "fold":
        numel = math.prod(weights.shape[1:])
        if numel > MAX_PER_SAMPLE_WEIGHT_NUMEL:
            raise ValueError(
                f"samplewise_conv: route 'fold' would copy the weights per sample, and one sample's weight "
                f"{tuple(weights.shape[1:])} has {numel} entries, over the {MAX_PER_SAMPLE_WEIGHT_NUMEL} budget; "
                "use 'stacked' or 'linear' (route='auto' never folds above it)"
            )
    return ConvPlan(
        route,
        _CONV[n],
        weights,
        biases,
        stride_t,
        conv_pad,
        explicit,
        mode,
        dilation_t,
        groups,
        c_out,
        out_spatial,
        kernel,
    )


def _crop_to_reachable_taps(weights, spatial, pad, stride, dilation, out_spatial) -> tuple[Tensor, tuple[int, ...]]:
    """Drops kernel taps that only ever read zero padding (a view of ``weights``), with the padding shrunk to match.

    A 7x7 depthwise kernel with padding 3 on a 2x2 input reads real data with its central 3x3 taps only; the
    convolution libraries skip padding too, but oneDNN's depthwise kernel was ~20x slower on such shapes than on the
    cropped 3x3 one (convnext_atto's last stage at 64x64). Only symmetric crops are made, so the padding stays
    symmetric; the output is unchanged, each dropped term being a zero of the padding times a weight.
    """
    crops, new_pad = _reachable_crop(
        tuple(weights.shape[3:]), tuple(spatial), tuple(pad), tuple(stride), tuple(dilation), tuple(out_spatial)
    )
    if crops is None:
        return weights, pad
    return weights[(slice(None), slice(None), slice(None), *(slice(lo, hi) for lo, hi in crops))], new_pad


@functools.lru_cache(maxsize=1024)
def _reachable_crop(kernel, spatial, pad, stride, dilation, out_spatial):
    """The symmetric tap crop ((lo, hi) per dim, or None) and the padding after it: a function of shapes only,
    cached because the scan over taps and output positions cost more than a small convolution."""
    crops, new_pad = [], []
    for k, p, s, d, o, size in zip(kernel, pad, stride, dilation, out_spatial, spatial, strict=True):
        reach = [t for t in range(k) if any(0 <= j * s + t * d - p < size for j in range(o))]
        lo = reach[0] if reach else 0
        hi = reach[-1] if reach else k - 1
        cut = min(lo, k - 1 - hi)  # symmetric part of the crop
        p2 = p - cut * d
        if cut <= 0 or p2 < 0 or (size + 2 * p2 - d * (k - 2 * cut - 1) - 1) // s + 1 != o:
            crops.append((0, k))
            new_pad.append(p)
            continue
        crops.append((cut, k - cut))
        new_pad.append(p2)
    if all(c == (0, k) for c, k in zip(crops, kernel, strict=True)):
        return None, pad
    return tuple(crops), tuple(new_pad)


def _mix_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mixed(coefficients: Tensor, stacked: Tensor) -> Tensor:
    """``[B, S] x [S, ...]`` -> ``[B, ...]``: each sample's sum over sources, accumulated in fp32 (fp64 for fp64).

    Elementwise multiply-adds, not a ``[B, S] @ [S, numel]`` product: with S this small a GEMM library's skinny
    path was ~10x slower (MKL on this AMD CPU), and the sum is memory-bound anyway.
    """
    acc = _mix_dtype(stacked.dtype)
    c = coefficients.to(acc)
    flat = stacked.reshape(stacked.shape[0], 1, -1)
    out = flat[0].to(acc) * c[:, 0:1]
    for s in range(1, stacked.shape[0]):
        out.addcmul_(flat[s].to(acc), c[:, s : s + 1])
    return out.to(stacked.dtype).view(coefficients.shape[0], *stacked.shape[1:])


def _fold(conv, x, weights, coefficients, biases, stride, pad, dilation, groups) -> Tensor:
    """The batch folded into channels: one grouped convolution with per-sample weights."""
    b, c_in = x.shape[0], x.shape[1]
    w = _mixed(coefficients, weights)  # [B, C_out, C_in/g, *k]
    bias = _mixed(coefficients, biases).reshape(-1) if biases is not None else None
    y = conv(
        x.reshape(1, b * c_in, *x.shape[2:]),
        w.reshape(-1, *w.shape[2:]),
        bias,
        stride,
        pad,
        dilation,
        b * groups,
    )
    return y.view(b, weights.shape[1], *y.shape[2:])


def _combine(y: Tensor, coefficients: Tensor) -> Tensor:
    """``y`` ``[B, M, S, N]`` -> ``[B, M, N]`` = sum_s c[b, s] y[b, :, s]."""
    if y.dtype == torch.float64:
        return torch.einsum("bmsn,bs->bmn", y, coefficients.to(torch.float64))
    return sample_combine(y, coefficients.to(torch.float32))


def _stacked(conv, x, weights, coefficients, biases, stride, pad, dilation, groups) -> Tensor:
    """S partial outputs from one convolution with stacked output channels, combined per sample.

    Grouped and depthwise convolutions run one convolution per source instead: stacking S outputs per group would
    turn a depthwise layer into a general grouped one, which the convolution library runs ~5x slower.
    """
    if groups > 1:
        acc = _mix_dtype(x.dtype)
        c = coefficients.to(acc)
        out = None
        for s in range(weights.shape[0]):
            y = conv(x, weights[s], biases[s] if biases is not None else None, stride, pad, dilation, groups)
            cs = c[:, s].view(-1, *([1] * (y.dim() - 1)))
            out = y.to(acc) * cs if out is None else out.addcmul_(y.to(acc), cs)
        return out.to(x.dtype)
    b = x.shape[0]
    s, c_out = weights.shape[0], weights.shape[1]
    cg = c_out // groups
    # Output channels ordered [group, source, channel-in-group] so that each group's stacked block reads only
    # that group's input channels; for groups == 1 this is a free view of a contiguous [S, C_out, ...].
    w = weights.reshape(s, groups, cg, *weights.shape[2:]).transpose(0, 1).reshape(groups * s * cg, *weights.shape[2:])
    bias = biases.reshape(s, groups, cg).transpose(0, 1).reshape(-1) if biases is not None else None
    y = conv(x, w, bias, stride, pad, dilation, groups)  # [B, groups*S*cg, *out]
    out_spatial = y.shape[2:]
    out = _combine(y.reshape(b, groups, s, -1), coefficients)  # [B, groups, cg * P]
    return out.view(b, c_out, *out_spatial)


def _linear(x, weights, coefficients, biases, stride, pad, dilation, out_spatial, kernel) -> Tensor:
    """The convolution as a per-sample linear map of its patches (groups == 1) through samplewise_linear.

    Works channels-last throughout: the patches ``[B, L, prod(k) * C_in]`` are gathered from an NHWC view (runs of
    C_in contiguous entries, so the copy streams), ``weights`` is the plan's ``[S, C_out, prod(k) * C_in]`` view, and
    the ``[B, L, C_out]`` result is returned as a channels-last view ``[B, C_out, *out]``.
    """
    b, c_in = x.shape[0], x.shape[1]
    c_out = weights.shape[1]
    n = len(kernel)
    xl = x.permute(0, *range(2, 2 + n), 1)  # [B, *spatial, C_in], a view
    if any(pad):
        xp = x.new_zeros((b, *(size + 2 * p for size, p in zip(x.shape[2:], pad, strict=True)), c_in))
        xp[(slice(None), *(slice(p, p + size) for size, p in zip(x.shape[2:], pad, strict=True)))] = xl
        xl = xp
    if all(k == 1 for k in kernel):
        # 1x1: subsample by the stride; a channels-last input needs no copy at all.
        idx = (slice(None), *(slice(None, o * st, st) for o, st in zip(out_spatial, stride, strict=True)))
        patches = xl[idx].reshape(b, -1, c_in)
    else:
        # im2col: windows along every spatial dim (Tensor.unfold: views), then one copy in (*k, C_in) order.
        p = xl
        for i in range(n):
            p = p.unfold(1 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
            if dilation[i] > 1:
                p = p[..., :: dilation[i]]
        # p: [B, *out, C_in, *k] -> [B, *out, *k, C_in]
        p = p.permute(0, *range(1, 1 + n), *range(2 + n, 2 + 2 * n), 1 + n)
        patches = p.reshape(b, -1, math.prod(kernel) * c_in)
    y = samplewise_linear(patches, weights, coefficients, biases)  # [B, L, C_out]
    return y.view(b, *out_spatial, c_out).movedim(-1, 1)


def samplewise_conv_weights(weights: Sequence[Tensor] | Tensor) -> Tensor:
    """Stacks S ``[C_out, C_in/groups, *k]`` weights into the ``[S, C_out, C_in/groups, *k]`` tensor read fastest.

    Build it once per layer and keep it (as :func:`dawin_ext.samplewise_linear_weights` for linear layers):

    * 1x1 kernels (which take the ``"linear"`` route on the CPU): storage ``[S, C_in/groups, C_out]``, so
      samplewise_linear reads it with no copy per call;
    * every other kernel: plain contiguous ``[S, C_out, C_in/groups, *k]``. The ``"stacked"`` route views it as
      ``[S*C_out, ...]`` for free, and a permuted storage made resnet18's stacked convolutions 2x slower; the
      ``"linear"`` route copies such weights once per call into ``[S, prod(k)*C_in, C_out]``.

    Every route accepts any layout; only the speed differs.
    """
    w = torch.stack(list(weights), 0) if not isinstance(weights, Tensor) else weights
    if w.dim() not in (4, 5, 6):
        raise ValueError(f"samplewise_conv_weights: need S weights [C_out, C_in/groups, *k], got {tuple(w.shape)}")
    w = w.detach()
    if any(k != 1 for k in w.shape[3:]):
        return w.contiguous()
    n = w.dim() - 3
    perm = (0, *range(3, 3 + n), 2, 1)
    inv = [perm.index(i) for i in range(w.dim())]
    return w.permute(perm).contiguous().permute(inv)
