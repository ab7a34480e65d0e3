"""The exact per-sample engine: a module's own code, vmapped over the batch, with lazily merged parameters.

How one call runs (``Engine.run``):

1. Every parameter or buffer that differs between the sources is, in the engine's copy of the module, a *meta*
   tensor (a placeholder with the right shape and dtype but no data). Its sources live in a :class:`Stack`:
   ``parts = [theta_0, theta_a - theta_0, ...]`` over the "active" sources (those that differ from source 0).
   Parameters equal in every source stay ordinary tensors, shared by all samples.
2. The module's method runs under ``torch.vmap`` over the batch, each sample seeing a batch of one, with a
   :class:`torch.overrides.TorchFunctionMode` active. Every torch call whose arguments include a placeholder goes
   through the mode, which computes it for sample ``b`` with ``theta_b = sum_s c[b, s] theta_s``:

   * ``F.linear`` / ``matmul`` with a placeholder weight -> :func:`dawin_ext.samplewise_linear` (a custom op with a
     vmap rule: the whole batch in one call, merged weights formed block by block, never a ``[B, out, in]`` copy);
   * ``F.conv1d/2d/3d`` -> :func:`dawin_ext.exact.conv.samplewise_conv` (likewise);
   * ``F.embedding`` -> the S source tables gathered and blended per sample;
   * a :class:`LowRankStack` (a weight whose sources differ from one shared base by LoRA factors,
     ``theta_s = W0 + scale_s B_s A_s``) under ``F.linear`` / ``matmul`` -> :func:`dawin_ext.ops.samplewise_lora`
     (base GEMM + shrink, per-sample scaling of the rank blocks, expand); row/column slices and transposes of it
     stay low-rank; any other use builds the merged matrix per sample (refused above 1M entries, naming it);
   * view ops (slicing, split, chunk, transpose, reshape, ...) -> a new placeholder whose stack is the view of each
     part (views are linear, so the view of the merged tensor is the merge of the views);
   * metadata (shape, dtype, device) -> answered from source 0's tensor;
   * anything else -> the placeholder is *materialised* per sample (``[B, ...]`` inside vmap, from the
     coefficients) and the op runs on it under vmap's own batching rule. A per-sample copy of a matrix with more
     than 1M entries is refused, and all materialisations of one call share a byte budget.

Why it is exact by construction: the merged value of a varying parameter is never approximated, and its source-0
value is not reachable at all (the placeholder has no data): every use either goes through an op that computes
the merged result exactly (linear, conv, embedding are linear in the weight; views commute with the merge) or sees
the merged value itself. A use that bypasses the mode cannot silently read wrong numbers, it fails on a meta tensor.
"""

from __future__ import annotations

import functools
import math
import threading
import traceback
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..ops import _ops, samplewise_linear_weights, samplewise_lora_factors
from .conv import ConvPlan, samplewise_conv, samplewise_conv_plan, samplewise_conv_weights

__all__ = [
    "Stack",
    "LowRankStack",
    "Engine",
    "UnsupportedParameterError",
    "MaterializationBudgetError",
    "DataDependentControlFlowError",
    "InPlaceUpdateError",
    "NoBatchingRuleError",
    "NoBatchingRuleWarning",
    "MAX_MATERIALIZED_MATRIX_NUMEL",
    "DEFAULT_MATERIALIZE_BUDGET_BYTES",
]

#: A parameter of 2+ dims with more entries than this is never copied per sample (it must reach a kernel op).
MAX_MATERIALIZED_MATRIX_NUMEL = 1 << 20
#: Default byte budget for all per-sample materialisations of one call (``[B, ...]`` tensors).
DEFAULT_MATERIALIZE_BUDGET_BYTES = 1 << 30


class UnsupportedParameterError(ValueError):
    """A parameter differs between sources but cannot be interpolated per sample exactly (e.g. an integer buffer,
    or a large matrix used through an op that would need a per-sample copy of it)."""


class MaterializationBudgetError(UnsupportedParameterError):
    """Per-sample copies of varying parameters would exceed the interpolator's byte budget."""


class DataDependentControlFlowError(RuntimeError):
    """Python control flow (``if``, ``float()``, ``.item()``) on a value that differs between samples."""


class InPlaceUpdateError(RuntimeError):
    """A parameter or buffer was modified in place during the forward pass (e.g. BatchNorm in training mode)."""


class NoBatchingRuleError(RuntimeError):
    """An op has no vmap batching rule, so it would run as a per-sample loop (raised with ``strict=True``)."""


class NoBatchingRuleWarning(UserWarning):
    """An op has no vmap batching rule and runs as a per-sample loop (exact, but slow)."""


# --------------------------------------------------------------------------------------------------------------
# kernels as custom ops with vmap rules
# --------------------------------------------------------------------------------------------------------------
def _fold_batch(x: Tensor, x_bdim: int | None, coef: Tensor, c_bdim: int | None, batch: int, feature_dims: int):
    """Moves the vmap batch to dim 0 of ``x`` (expanding an unbatched x) and makes one coefficient row per row of
    the folded ``[B*m, ...]`` input when a sample carries ``m`` leading rows. Returns (x, coef_rows, m)."""
    x = x.movedim(x_bdim, 0) if x_bdim is not None else x.unsqueeze(0).expand(batch, *x.shape)
    coef = coef.movedim(c_bdim, 0) if c_bdim is not None else coef.unsqueeze(0).expand(batch, *coef.shape)
    coef = coef.to(torch.float32).contiguous()
    lead = x.shape[1 : x.dim() - feature_dims]
    m = math.prod(lead)
    if m != 1 or len(lead) != 1:
        x = x.reshape(batch * m, *x.shape[x.dim() - feature_dims :])
        coef = coef.repeat_interleave(m, 0) if m != 1 else coef
    else:
        x = x.squeeze(1)
    return x, coef, lead


@torch.library.custom_op("dawin_ext_exact::linear", mutates_args=())
def _linear_op(x: Tensor, weights: Tensor, biases: Tensor | None, coef: Tensor) -> Tensor:
    """One sample: ``x @ (sum_s coef[s] W_s)^T + sum_s coef[s] b_s`` (x ``[..., IN]``, weights ``[S, OUT, IN]``)."""
    return _ops.samplewise_linear(x.unsqueeze(0), weights, biases, coef.to(torch.float32).unsqueeze(0))[0]


@_linear_op.register_fake
def _(x, weights, biases, coef):
    return x.new_empty((*x.shape[:-1], weights.shape[1]))


@torch.library.register_vmap("dawin_ext_exact::linear")
def _linear_vmap(info, in_dims, x, weights, biases, coef):
    x_bdim, w_bdim, b_bdim, c_bdim = in_dims
    if w_bdim is not None or b_bdim is not None:
        raise RuntimeError("dawin_ext_exact::linear: the stacked weights must be shared by the batch")
    x = x.movedim(x_bdim, 0) if x_bdim is not None else x.unsqueeze(0).expand(info.batch_size, *x.shape)
    coef = coef.movedim(c_bdim, 0) if c_bdim is not None else coef.unsqueeze(0).expand(info.batch_size, -1)
    if x.dim() == 1:
        x = x.unsqueeze(1)
    out = _ops.samplewise_linear(x, weights, biases, coef.to(torch.float32).contiguous())
    return out, 0


@torch.library.custom_op("dawin_ext_exact::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, coef: Tensor
) -> Tensor:
    """One sample: ``F.linear(x, weight + sum_s coef[s] B_s A_s, bias)`` (coef has the adapters' scales folded in)."""
    xb = x.reshape(1, 1, -1) if x.dim() == 1 else x.unsqueeze(0)
    out = _ops.samplewise_lora(xb, lora_a, lora_b, coef.to(torch.float32).unsqueeze(0), weight, bias)
    return out.reshape(*x.shape[:-1], lora_b.shape[1])


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, coef):
    return x.new_empty((*x.shape[:-1], lora_b.shape[1]))


@torch.library.register_vmap("dawin_ext_exact::lora_linear")
def _lora_linear_vmap(info, in_dims, x, weight, bias, lora_a, lora_b, coef):
    x_bdim, w_bdim, b_bdim, a_bdim, bb_bdim, c_bdim = in_dims
    if any(d is not None for d in (w_bdim, b_bdim, a_bdim, bb_bdim)):
        raise RuntimeError("dawin_ext_exact::lora_linear: the base weight, bias and LoRA factors must be shared")
    x = x.movedim(x_bdim, 0) if x_bdim is not None else x.unsqueeze(0).expand(info.batch_size, *x.shape)
    coef = coef.movedim(c_bdim, 0) if c_bdim is not None else coef.unsqueeze(0).expand(info.batch_size, -1)
    if x.dim() == 1:
        x = x.unsqueeze(1)
    out = _ops.samplewise_lora(x, lora_a, lora_b, coef.to(torch.float32).contiguous(), weight, bias)
    return out, 0


@torch.library.custom_op("dawin_ext_exact::conv", mutates_args=())
def _conv_op(
    x: Tensor,
    weights: Tensor,
    biases: Tensor | None,
    coef: Tensor,
    stride: list[int],
    padding: list[int],
    padding_str: str,
    dilation: list[int],
    groups: int,
) -> Tensor:
    """One sample: ``conv(x, sum_g coef[g] W_g, sum_g coef[g] b_g)``; x is ``[m, C, *spatial]`` or ``[C, *spatial]``."""
    nd = weights.dim() - 3
    unbatched = x.dim() == nd + 1
    xb = x.unsqueeze(0) if unbatched else x
    rows = coef.to(torch.float32).unsqueeze(0).expand(xb.shape[0], -1)
    out = samplewise_conv(xb, weights, rows, biases, stride, padding_str or padding, dilation, groups)
    return out[0] if unbatched else out


@_conv_op.register_fake
def _(x, weights, biases, coef, stride, padding, padding_str, dilation, groups):
    nd = weights.dim() - 3
    xb = x.unsqueeze(0) if x.dim() == nd + 1 else x
    w = weights.new_empty(weights.shape[1:], device="meta")
    out = F.conv2d if nd == 2 else (F.conv1d if nd == 1 else F.conv3d)
    y = out(xb.to("meta"), w, None, stride, padding_str or padding, dilation, groups)
    y = x.new_empty(y.shape)
    return y[0] if x.dim() == nd + 1 else y


@torch.library.register_vmap("dawin_ext_exact::conv")
def _conv_vmap(info, in_dims, x, weights, biases, coef, stride, padding, padding_str, dilation, groups):
    x_bdim, w_bdim, b_bdim, c_bdim = in_dims[:4]
    if w_bdim is not None or b_bdim is not None:
        raise RuntimeError("dawin_ext_exact::conv: the stacked weights must be shared by the batch")
    nd = weights.dim() - 3
    xb, rows, lead = _fold_batch(x, x_bdim, coef, c_bdim, info.batch_size, nd + 1)
    out = samplewise_conv(xb, weights, rows, biases, stride, padding_str or padding, dilation, groups)
    return out.reshape(info.batch_size, *lead, *out.shape[1:]), 0


@torch.library.custom_op("dawin_ext_exact::sdpa", mutates_args=())
def _sdpa_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> Tensor:
    """F.scaled_dot_product_attention, as an op whose vmap rule folds the batch into SDPA's leading dims (torch's
    fused CPU attention has no batching rule of its own and would run as a per-sample loop)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


@_sdpa_op.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.register_vmap("dawin_ext_exact::sdpa")
def _sdpa_vmap(info, in_dims, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    b = info.batch_size

    def front(t, d):
        return t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(b, *t.shape)

    qd, kd, vd, md = in_dims[:4]
    q, k, v = front(q, qd), front(k, kd), front(v, vd)
    if attn_mask is not None and md is not None:
        attn_mask = attn_mask.movedim(md, 0)
        # align the per-sample mask's dims with q's (SDPA broadcasts from the right)
        while attn_mask.dim() < q.dim():
            attn_mask = attn_mask.unsqueeze(1)
    if q.dim() == 3:  # per-sample [L, E]: give SDPA a head dim so the batch stays a leading dim
        out = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
            attn_mask=None if attn_mask is None else (attn_mask.unsqueeze(1) if md is not None else attn_mask),
            dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
        return out.squeeze(1), 0
    lead = q.shape[:-3]
    if q.dim() > 4 and k.shape[:-3] == lead and v.shape[:-3] == lead:
        # Fold the batch into SDPA's one leading dim: CPU flash attention takes 4-d inputs only and would
        # otherwise fall back to the unfused math path.
        if attn_mask is not None:
            attn_mask = attn_mask.expand(*q.shape[:-2], attn_mask.shape[-2], attn_mask.shape[-1])
            attn_mask = attn_mask.reshape(-1, *attn_mask.shape[-3:])
        out = F.scaled_dot_product_attention(
            q.reshape(-1, *q.shape[-3:]), k.reshape(-1, *k.shape[-3:]), v.reshape(-1, *v.shape[-3:]),
            attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
        return out.reshape(*lead, *out.shape[-3:]), 0
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
    return out, 0


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _sdpa_op(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale, bool(enable_gqa))


# --------------------------------------------------------------------------------------------------------------
# stacks and placeholders
# --------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Stack:
    """The sources of one varying tensor: ``parts[0] = theta_0``, ``parts[1 + i] = theta_{active[i]} - theta_0``."""

    name: str
    parts: Tensor  # [S, *shape]
    active: tuple[int, ...]
    placeholder: Tensor = field(repr=False)  # meta tensor standing for the merged value
    _flat: Tensor | None = field(default=None, repr=False)

    @property
    def flat(self) -> Tensor:
        """``parts`` as a contiguous ``[S, numel]`` matrix (kept: a transposed linear layout would copy per call)."""
        if self._flat is None:
            self._flat = self.parts.reshape(self.parts.shape[0], -1).contiguous()
        return self._flat

    @functools.cached_property
    def flat_base(self) -> Tensor:
        """``flat[:1]``, kept (slicing per call costs more than the small merges it feeds)."""
        return self.flat[:1]

    @functools.cached_property
    def flat_deltas(self) -> Tensor:
        """``flat[1:]``, kept."""
        return self.flat[1:]

    @property
    def ref(self) -> Tensor:
        """Source 0's value (for metadata questions only)."""
        return self.parts[0]

    @property
    def shape(self) -> torch.Size:
        return self.parts.shape[1:]


@dataclass(eq=False)
class LowRankStack:
    """A varying matrix whose sources share one base and differ by low-rank factors (LoRA adapters):
    ``theta_s = base + scales[i] * lora_b[i] @ lora_a[i]`` for ``s = sources[i]``, ``theta_s = base`` otherwise.

    Sample ``b``'s merged value is ``base + sum_i c[b, sources[i]] scales[i] B_i A_i`` (rows sum to 1), so
    ``F.linear`` on it is the base layer plus :func:`dawin_ext.ops.samplewise_lora`: no merged weight exists.
    """

    name: str
    base: Tensor  # [OUT, IN], shared by every source
    lora_a: Tensor  # [S', R, IN]
    lora_b: Tensor  # [S', OUT, R] (stored [S', R, OUT], see samplewise_lora_factors)
    scales: Tensor  # [S'] float32
    sources: tuple[int, ...]  # the source index of each factor pair
    placeholder: Tensor = field(repr=False)
    module: str = ""  # the module that owns the weight, for error messages

    @property
    def ref(self) -> Tensor:
        """The base value (for metadata questions only)."""
        return self.base

    @property
    def shape(self) -> torch.Size:
        return self.base.shape


def make_low_rank_stack(
    name: str,
    base: Tensor,
    factors: Sequence[tuple[int, Tensor, Tensor, float]],
    placeholder: Tensor | None = None,
    module: str = "",
) -> LowRankStack:
    """A :class:`LowRankStack` from ``(source index, A [R_i, IN], B [OUT, R_i], scale)`` per adapter; adapters of
    lower rank are zero-padded to the largest rank (exact: the padding adds zero)."""
    if not factors:
        raise ValueError(f"make_low_rank_stack: {name!r} needs at least one adapter")
    # Stored as [IN, OUT] (a transposed view keeps the [OUT, IN] shape): the layout samplewise_lora's fp32 CPU
    # base GEMM (samplewise_linear's brgemm path) reads in place.
    base = base.detach().t().contiguous().t()
    rank = max(int(a.shape[0]) for _, a, _, _ in factors)
    a_list, b_list = [], []
    for src, a, b, _ in factors:
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != base.shape[1] or b.shape[0] != base.shape[0]:
            raise ValueError(
                f"LoRA factors of {name!r} for source {src}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                f"the base weight {tuple(base.shape)} (expected A [R, {base.shape[1]}], B [{base.shape[0]}, R])"
            )
        pad = rank - a.shape[0]
        a_list.append(F.pad(a.detach().to(base.dtype), (0, 0, 0, pad)))
        b_list.append(F.pad(b.detach().to(base.dtype), (0, pad)))
    lora_a, lora_b = samplewise_lora_factors(a_list, b_list)
    scales = torch.tensor([float(sc) for *_, sc in factors], dtype=torch.float32, device=base.device)
    if placeholder is None:
        placeholder = torch.empty(base.shape, dtype=base.dtype, device="meta")
    sources = tuple(int(src) for src, *_ in factors)
    return LowRankStack(
        name, base, lora_a.to(base.device), lora_b.to(base.device), scales, sources, placeholder, module
    )


def make_stack(name: str, tensors: Sequence[Tensor], placeholder: Tensor | None = None) -> Stack:
    t0 = tensors[0].detach()
    active = tuple(s for s in range(1, len(tensors)) if not torch.equal(tensors[s], t0))
    deltas = [tensors[s].detach() - t0 for s in active]
    if t0.dim() == 2 and t0.is_floating_point():
        parts = samplewise_linear_weights([t0, *deltas])  # [S, OUT, IN] in the layout samplewise_linear reads fastest
    elif 3 <= t0.dim() <= 5 and t0.is_floating_point() and all(k == 1 for k in t0.shape[2:]):
        # A 1x1 convolution's weight: stored [S, C_in, C_out] (samplewise_conv_weights), which the CPU's "linear"
        # route reads in place; the plain stack made it copy the weights on every call.
        parts = samplewise_conv_weights([t0, *deltas])
    else:
        parts = torch.stack([t0, *deltas], 0)
    if placeholder is None:
        placeholder = torch.empty(t0.shape, dtype=t0.dtype, device="meta")
    return Stack(name, parts, active, placeholder)


# Tensor methods / torch functions that only read metadata: answered from source 0's tensor.
_METADATA_ATTRS = {
    "shape", "dtype", "device", "is_cuda", "is_cpu", "is_meta", "ndim", "requires_grad", "layout", "is_sparse",
    "is_quantized", "is_leaf", "grad", "names", "is_mkldnn", "is_complex", "itemsize", "nbytes", "is_nested",
    "grad_fn", "_version", "is_mps", "is_xpu",
}  # fmt: skip
_METADATA_FUNCS = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.ndimension, torch.Tensor.nelement,
    torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.get_device,
    torch.Tensor.__len__, torch.Tensor.is_contiguous, torch.Tensor.stride, torch.numel, torch.is_floating_point,
    torch.is_complex, torch.Tensor.is_signed, torch.is_tensor, torch.Tensor.__format__,
}  # fmt: skip
# Views and copies that commute with the merge: applied to every part, giving a new stack.
_VIEW_FUNCS = {
    torch.Tensor.__getitem__, torch.Tensor.split, torch.Tensor.chunk, torch.Tensor.unbind, torch.Tensor.t,
    torch.Tensor.transpose, torch.Tensor.permute, torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.flatten,
    torch.Tensor.unflatten, torch.Tensor.squeeze, torch.Tensor.unsqueeze, torch.Tensor.narrow, torch.Tensor.select,
    torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.detach, torch.Tensor.view_as, torch.Tensor.reshape_as,
    torch.Tensor.movedim, torch.Tensor.swapaxes, torch.Tensor.tensor_split, torch.Tensor.unsafe_split,
    torch.Tensor.unsafe_chunk, torch.split, torch.chunk, torch.unbind, torch.t, torch.transpose, torch.permute,
    torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, torch.narrow, torch.select,
    torch.movedim, torch.swapaxes, torch.tensor_split, torch.clone, torch.detach, torch.unsafe_split,
    torch.unsafe_chunk,
}  # fmt: skip
_VIEW_ATTRS = {"T", "mT", "data"}
# Conversions that return the tensor itself when dtype and device already match.
_IDENTITY_IF_SAME = {
    torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half,
    torch.Tensor.bfloat16, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.requires_grad_,
}  # fmt: skip
_DATA_DEPENDENT = {
    torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__complex__,
}  # fmt: skip
_DIFFERS = object()


def _same_for_every_sample(func, args, kwargs):
    """``func`` (a Python-value op such as ``bool()``) evaluated per sample: its value if every sample agrees,
    else ``_DIFFERS``. When all samples take the same branch, the batched pass follows exactly that branch."""
    t = args[0]
    if not isinstance(t, Tensor) or not torch._C._functorch.is_batchedtensor(t) or len(args) > 1 or kwargs:
        return _DIFFERS
    level = torch._C._functorch.maybe_get_level(t)
    value, bdim = torch._C._functorch._unwrap_batched(t, level)
    if torch._C._functorch.is_batchedtensor(value):
        return _DIFFERS  # nested vmap levels: not handled
    value = value.movedim(bdim, 0)
    results = [func(value[i]) for i in range(value.shape[0])]
    first = results[0]
    if isinstance(first, Tensor):
        return _DIFFERS  # tensor-valued (any/all): keep them batched
    return first if all(r == first for r in results[1:]) else _DIFFERS


_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _may_hold_meta(args: tuple, kwargs: dict) -> bool:
    """Whether a placeholder (a meta tensor) may be among the arguments: checks them and the members of list and
    tuple arguments; any deeper nesting counts as "may" (the caller then flattens the arguments fully)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            if a.is_meta:
                return True
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, Tensor):
                    if b.is_meta:
                        return True
                elif isinstance(b, (list, tuple, dict)):
                    return True
        elif isinstance(a, dict):
            return True
    return False


class _ShallowSpec:
    """How :func:`_flatten_args` split ``(args, kwargs)`` when no container among them holds a tensor."""

    __slots__ = ("n_args", "keys")

    def __init__(self, n_args: int, keys: tuple) -> None:
        self.n_args, self.keys = n_args, keys


def _flatten_args(args: tuple, kwargs: dict) -> tuple[list, object]:
    """``(args, kwargs)`` as leaves and a spec for :func:`_unflatten_args`. Arguments are leaves themselves unless
    a list, tuple or dict among them holds a tensor or a container (then pytree flattens everything): a tuple of
    ints such as a stride stays one leaf, which is all the dispatch needs, and pytree's full walk cost ~0.1 ms per
    call."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, dict) or (
            isinstance(a, (list, tuple)) and any(isinstance(b, (Tensor, list, tuple, dict)) for b in a)
        ):
            return pytree.tree_flatten((args, kwargs))
    return [*args, *kwargs.values()], _ShallowSpec(len(args), tuple(kwargs))


def _unflatten_args(leaves: Sequence, spec) -> tuple[tuple, dict]:
    """The inverse of :func:`_flatten_args`."""
    if isinstance(spec, _ShallowSpec):
        return tuple(leaves[: spec.n_args]), dict(zip(spec.keys, leaves[spec.n_args :], strict=True))
    return pytree.tree_unflatten(leaves, spec)


def _batch_norm_affine(mean: Tensor, var: Tensor, weight, bias, eps: float) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm as the affine map it applies: ``scale = w / sqrt(var + eps)``, ``shift = b - mean * scale``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def _batch_norm_rows(x: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float) -> Tensor:
    """Eval-mode batch norm of a whole batch outside vmap: ``x`` is ``[B, *per-sample]`` with a per-sample
    ``[N, C, *spatial]`` or ``[C]``; each statistic is ``[C]`` (shared) or ``[B, C]`` (per sample)."""
    if all(t is None or t.dim() == 1 for t in (mean, var, weight, bias)):
        # Shared statistics: the stock kernel on the batch folded into N, row by row the same computation.
        folded = x.reshape(-1, *x.shape[2:]) if x.dim() >= 3 else x
        return F.batch_norm(folded, mean, var, weight, bias, False, 0.0, eps).view(x.shape)
    # Per-sample statistics: the affine map batch_norm applies, x * scale + shift, with per-sample scale/shift.
    scale, shift = _batch_norm_affine(mean, var, weight, bias, eps)
    b, c = x.shape[0], scale.shape[-1]
    shape = (b, 1, c, *([1] * (x.dim() - 3))) if x.dim() >= 3 else (b, c)
    scale = scale.expand(b, c).to(x.dtype).reshape(shape)
    shift = shift.expand(b, c).to(x.dtype).reshape(shape)
    return torch.addcmul(shift, x, scale)


_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


def _func_name(func: Callable) -> str:
    if getattr(func, "__name__", "") == "__get__":
        owner = getattr(func, "__self__", None)
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    mod = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if qual.startswith("_VariableFunctionsClass."):
        return "torch." + qual.split(".", 1)[1]
    if qual.startswith("TensorBase.") or qual.startswith("Tensor."):
        return "Tensor." + qual.split(".", 1)[1]
    if mod.startswith("torch.nn.functional"):
        return f"F.{qual}"
    return f"torch.{qual}" if not mod or mod.startswith("torch") else f"{mod}.{qual}"


def _getter_attr(func: Callable) -> str | None:
    if getattr(func, "__name__", "") == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None)
    return None


def _is_inplace(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__setitem__":
        return True
    if name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__init__", "__iter__"):
        return True  # __iadd__ and friends
    return name.endswith("_") and not name.endswith("__")


def _user_frame() -> str:
    """The innermost frame outside torch and this package: where the module's code made the call."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename.replace("\\", "/")
        if "/torch/" in f or "/dawin_ext/exact/" in f or "/functorch/" in f:
            continue
        return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "<unknown>"


def _mha_body() -> Callable:
    """``F.multi_head_attention_forward`` without its torch-function dispatch, so its own body runs under the mode
    (its in-projections reach ``F.linear`` with the placeholder weights)."""
    f = F.multi_head_attention_forward
    g = dict(vars(F))
    g["has_torch_function"] = lambda *_: False
    body = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
    body.__kwdefaults__ = f.__kwdefaults__
    return body


_MHA_BODY = _mha_body()


# --------------------------------------------------------------------------------------------------------------
# the mode
# --------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _MergeGroup:
    """Small parameters with the same active sources, dtype and device that calls merge per sample, concatenated:
    a call merges all of them with ONE addmm and slices each out, instead of one small addmm each (between large
    kernels each small op ran with cold caches, ~50 us apiece). Built from the parameters earlier calls merged."""

    key: tuple
    base: Tensor  # [1, total]: source 0 of every member, concatenated
    deltas: Tensor  # [G - 1, total]
    slots: dict[int, tuple[int, int]]  # id(stack) -> (start, numel)


# Parameters up to this many entries join a merge group (norm affines, layer scales, biases, tokens).
_GROUP_MAX_NUMEL = 1 << 16


class _Call:
    """State of one engine call: the batched coefficient row inside vmap and the per-call caches."""

    def __init__(self, row: Tensor, rows: Tensor, batch: int, budget: int) -> None:
        self.row = row  # inside vmap: [S] per sample
        self.rows = rows  # the same coefficients outside vmap: [B, S]
        self.level = torch._C._functorch.maybe_get_level(row)  # this call's vmap level
        self.batch = batch
        self.budget = budget
        self.spent = 0
        self.coef: dict[tuple[int, ...], Tensor] = {}
        self.coef_rows: dict[tuple[tuple[int, ...], torch.dtype], Tensor] = {}
        self.materialized: dict[int, Tensor] = {}
        self.group_rows: dict[tuple, Tensor] = {}  # _MergeGroup key -> its [B, total] merged rows
        self.derived: dict[int, Stack] = {}
        self.keep: list[Tensor] = []  # derived placeholders stay alive so their ids stay unique
        self.log: list[tuple[str, tuple[int, ...]]] = []


class ExactMode(TorchFunctionMode):
    """Routes every torch call that touches a placeholder (see the module docstring)."""

    def __init__(self, engine: Engine, call: _Call) -> None:
        super().__init__()
        self.engine = engine
        self.call = call

    # -- helpers ---------------------------------------------------------------------------------------------
    def stack_of(self, t) -> Stack | None:
        if not isinstance(t, Tensor) or not t.is_meta:
            return None
        key = id(t)
        st = self.engine.stacks_by_id.get(key)
        if st is not None and st.placeholder is t:
            return st
        st = self.call.derived.get(key)
        return st if st is not None and st.placeholder is t else None

    def coef(self, st: Stack) -> Tensor:
        """``[1, c_a, ...]`` for this sample (batched inside vmap)."""
        c = self.call.coef.get(st.active)
        if c is None:
            row = self.call.row
            if st.active:
                idx = torch.tensor(st.active, device=row.device)
                c = torch.cat([torch.ones_like(row[:1]), row.index_select(0, idx)])
            else:
                c = torch.ones_like(row[:1])
            self.call.coef[st.active] = c
        return c

    def materialize(self, st: Stack, op: str) -> Tensor:
        got = self.call.materialized.get(id(st))
        if got is not None:
            return got
        self._account(st, op)
        merged = self.wrap(self.merged_rows(st))
        self.call.materialized[id(st)] = merged
        return merged

    def merged_rows(self, st: Stack) -> Tensor:
        """Every sample's merged value, outside vmap: ``[B, *shape]`` (one addmm for the whole batch, or a slice of
        the one addmm that merges every small parameter of its group, see :class:`_MergeGroup`)."""
        flat = st.flat
        if flat.shape[0] == 1:
            return flat[0].view(st.shape).unsqueeze(0).expand(self.call.batch, *st.shape)
        group = self.engine.merge_group_of(st)
        if group is not None:
            rows = self.call.group_rows.get(group.key)
            if rows is None:
                c = self.coef_rows(st, flat.dtype)
                rows = torch.addmm(group.base, c[:, 1:], group.deltas)
                self.call.group_rows[group.key] = rows
            start, numel = group.slots[id(st)]
            return rows[:, start : start + numel].view(self.call.batch, *st.shape)
        self.engine.note_small_merge(st)
        c = self.coef_rows(st, flat.dtype)
        return torch.addmm(st.flat_base, c[:, 1:], st.flat_deltas).view(self.call.batch, *st.shape)

    # -- the batch outside vmap: kernels take the whole batch in one call --------------------------------------
    def coef_rows(self, st: Stack, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[B, S]`` rows ``[1, c_a, ...]`` for this stack's active sources, outside vmap."""
        key = (st.active, dtype)
        c = self.call.coef_rows.get(key)
        if c is None:
            r = self.call.rows
            c = torch.cat([torch.ones_like(r[:, :1]), r[:, list(st.active)]], 1) if st.active else r[:, :1] * 0 + 1
            c = c.to(dtype).contiguous()
            self.call.coef_rows[key] = c
        return c

    def physical(self, t) -> Tensor | None:
        """``t`` outside vmap as ``[B, ...]`` (sample b's value at index b; an unbatched t is expanded), or None
        when t is batched at another vmap level (a vmap inside the module: the custom ops' vmap rules take it)."""
        level = torch._C._functorch.maybe_get_level(t)
        if level == -1:
            return t.unsqueeze(0).expand(self.call.batch, *t.shape)
        if level != self.call.level:
            return None
        value, bdim = torch._C._functorch._unwrap_batched(t, level)
        if torch._C._functorch.is_batchedtensor(value):
            return None
        return value.movedim(bdim, 0)

    def wrap(self, t: Tensor) -> Tensor:
        """A ``[B, ...]`` tensor back into this call's vmap level (dim 0 is the batch)."""
        return torch._C._functorch._add_batch_dim(t, 0, self.call.level)

    def rows_of(self, t, op: str) -> Tensor | None:
        """A parameter-like argument of ``op`` outside vmap: a placeholder's merged ``[B, *shape]`` (materialised
        and budgeted as for any other op), a batched tensor's ``[B, ...]``, a plain tensor as it is (shared by all
        samples); None when t is None or batched at another vmap level (then the caller takes the vmap path)."""
        if t is None:
            return None
        st = self.stack_of(t)
        if st is not None:
            t = self.materialize(st, op)
        return self.physical(t) if torch._C._functorch.is_batchedtensor(t) else t

    def _account(self, st: Stack, op: str) -> None:
        """Refuses a per-sample copy of a matrix above 1M entries or beyond the byte budget; logs the copy."""
        shape = st.shape  # metadata only: st.ref would build a tensor view per question
        numel = math.prod(shape)
        if len(shape) >= 2 and numel > MAX_MATERIALIZED_MATRIX_NUMEL:
            raise UnsupportedParameterError(
                f"parameter {st.name!r} {tuple(st.shape)} ({numel} entries) differs between sources and reaches "
                f"{op}, which would need a per-sample copy of it; matrices above {MAX_MATERIALIZED_MATRIX_NUMEL} "
                "entries are never copied per sample. Route it through F.linear / F.conv*d / F.embedding / matmul, "
                "or make it identical in all sources."
            )
        nbytes = self.call.batch * numel * st.placeholder.element_size()
        if self.call.spent + nbytes > self.call.budget:
            raise MaterializationBudgetError(
                f"materialising parameter {st.name!r} {tuple(st.shape)} per sample for {op} needs {nbytes} bytes "
                f"at batch {self.call.batch}; with {self.call.spent} bytes already used this exceeds the budget of "
                f"{self.call.budget} bytes. Raise it with SampleWiseInterpolator(..., "
                "materialize_budget_bytes=N), or use a smaller batch."
            )
        self.call.spent += nbytes
        self.call.log.append((st.name, tuple(shape)))

    def new_stack(self, st: Stack, parts: Tensor, what: str, lasting: bool = False) -> Tensor:
        ph = torch.empty(parts.shape[1:], dtype=parts.dtype, device="meta")
        derived = Stack(f"{st.name}{what}", parts, st.active, ph)
        if lasting:  # kept by the engine (its view cache holds the placeholder, so the id stays unique)
            self.engine.stacks_by_id[id(ph)] = derived
        else:
            self.call.derived[id(ph)] = derived
            self.call.keep.append(ph)
        return ph

    def _resolve(self, x, op: str):
        st = self.stack_of(x)
        return self.materialize(st, op) if st is not None else x

    # -- dispatch --------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _may_hold_meta(args, kwargs):  # the common case, without flattening the arguments
            return self._no_placeholder(func, args, kwargs)
        flat, spec = _flatten_args(args, kwargs)
        stacks = [self.stack_of(t) for t in flat]
        if not any(s is not None for s in stacks):
            return self._no_placeholder(func, args, kwargs)
        return self._with_placeholders(func, args, kwargs, flat, spec, stacks)

    def _no_placeholder(self, func, args, kwargs):
        """A call that touches no placeholder: run as it is, except for the checks and batch-folding ops below."""
        if func in _DATA_DEPENDENT or func is F.scaled_dot_product_attention or _is_inplace(func):
            flat = pytree.tree_leaves((args, kwargs))
            if func in _DATA_DEPENDENT and any(
                isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t) for t in flat
            ):
                same = _same_for_every_sample(func, args, kwargs)
                if same is not _DIFFERS:
                    return same
                raise DataDependentControlFlowError(
                    f"{_func_name(func)} on a value that differs between samples at {_user_frame()}: Python "
                    "control flow on such a value cannot run as one batched pass (it depends on a parameter that "
                    "differs between sources, or on the input). Make the parameter identical in all sources, or "
                    "write the branch with torch.where."
                )
            if func is F.scaled_dot_product_attention and any(
                isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t) for t in flat
            ):
                return _sdpa(*args, **kwargs)
            if _is_inplace(func) and flat and isinstance(flat[0], Tensor):
                name = self.engine.shared_names.get(id(flat[0]))
                if name is not None:
                    raise InPlaceUpdateError(
                        f"{_func_name(func)} modifies {name!r} of the module in place during the forward pass; "
                        "the exact mode is inference only and needs parameters and buffers unchanged"
                    )
        elif func is F.multi_head_attention_forward:
            return self.mha(*args, **kwargs)  # its SDPA call must come back here too
        elif func is F.batch_norm or func is F.layer_norm:
            # vmap's rules for these run the statistics per sample (batch_norm was ~50x slower than the stock
            # kernel on resnet18's shapes); folding the batch gives the stock kernel the whole batch.
            out = _HANDLERS[func](self, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)

    def _with_placeholders(self, func, args, kwargs, flat, spec, stacks):
        """A call with at least one placeholder among its arguments (see the module docstring for the routes)."""
        op = _func_name(func)
        first = next(s for s in stacks if s is not None)
        attr = _getter_attr(func)
        if attr in _METADATA_ATTRS or func in _METADATA_FUNCS:
            a, k = _unflatten_args([s.ref if s is not None else t for s, t in zip(stacks, flat, strict=False)], spec)
            return func(*a, **k)
        if func in _DATA_DEPENDENT:
            raise DataDependentControlFlowError(
                f"{op} on parameter {first.name!r}, which differs between sources, at {_user_frame()}: Python control "
                "flow on a per-sample parameter value cannot run as one batched pass. Make it identical in all "
                "sources, or write the branch with torch.where."
            )
        if _is_inplace(func) and func not in _IDENTITY_IF_SAME or "out" in kwargs:
            raise InPlaceUpdateError(
                f"{op} modifies parameter {first.name!r} in place during the forward pass; the exact mode is "
                "inference only and needs parameters and buffers unchanged"
            )
        if func is not F.multi_head_attention_forward and any(isinstance(s, LowRankStack) for s in stacks):
            return self._low_rank(func, op, attr, stacks, flat, spec, args, kwargs)
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(self, *args, **kwargs)
            if out is not NotImplemented:
                return out
        if func in _IDENTITY_IF_SAME and stacks[0] is not None and sum(s is not None for s in stacks) == 1:
            res = func(first.ref, *args[1:], **kwargs)
            if res is first.ref:
                return first.placeholder
        only_first = stacks[0] is not None and all(s is None for s in stacks[1:])
        unbatched_rest = not any(isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t) for t in flat[1:])
        if only_first and unbatched_rest and (func in _VIEW_FUNCS or attr in _VIEW_ATTRS):
            return self._view(func, first, args, kwargs, attr)
        # Any other op: the merged value itself, per sample.
        try:
            return self.call_on_merged(func, op, stacks, flat, spec)
        except RuntimeError as e:
            if "Batching rule not implemented" not in str(e):
                raise
        return self.per_sample_loop(func, op, stacks, flat, spec)

    def call_on_merged(self, func, op: str, stacks, flat, spec):
        """Calls ``func`` on every placeholder's merged value itself, per sample: dense and low-rank stacks are
        materialised alike, other arguments pass unchanged. A RuntimeError from ``func`` (e.g. no vmap batching
        rule) reaches the caller, which decides whether a per-sample loop may take over."""
        new = []
        for s, t in zip(stacks, flat, strict=True):
            if isinstance(s, LowRankStack):
                new.append(self.materialize_low_rank(s, op))
            elif s is not None:
                new.append(self.materialize(s, op))
            else:
                new.append(t)
        a, k = _unflatten_args(new, spec)
        return func(*a, **k)

    def per_sample_loop(self, func, op: str, stacks, flat, spec):
        """Runs ``func`` once per sample on plain tensors (an op vmap cannot batch, e.g. aten::lstm): exact but a
        Python loop, so it is announced once (or refused with ``strict=True``)."""
        self.engine.note_loop(op)
        level = torch._C._functorch.maybe_get_level(self.call.row)
        rows, bdim = torch._C._functorch._unwrap_batched(self.call.row, level)
        rows = rows.movedim(bdim, 0)
        batch = rows.shape[0]
        leaves = []
        for st, t in zip(stacks, flat, strict=True):
            if st is not None:
                self._account(st, op)
                c = torch.cat([torch.ones_like(rows[:, :1]), rows[:, list(st.active)]], 1).to(st.parts.dtype)
                leaves.append(("b", torch.tensordot(c, st.parts, dims=1)))
            elif isinstance(t, Tensor) and torch._C._functorch.maybe_get_level(t) == level:
                v, d = torch._C._functorch._unwrap_batched(t, level)
                leaves.append(("b", v.movedim(d, 0)))
            else:
                leaves.append(("s", t))
        outs = []
        for b in range(batch):
            a, k = _unflatten_args([v[b] if kind == "b" else v for kind, v in leaves], spec)
            outs.append(func(*a, **k))
        out_flat, out_spec = pytree.tree_flatten(outs[0])
        per = [pytree.tree_flatten(o)[0] for o in outs]
        wrapped = []
        for i, t in enumerate(out_flat):
            if isinstance(t, Tensor):
                wrapped.append(torch._C._functorch._add_batch_dim(torch.stack([p[i] for p in per]), 0, level))
            else:
                wrapped.append(t)
        return pytree.tree_unflatten(wrapped, out_spec)

    def _view(self, func, st: Stack, args, kwargs, attr):
        rest = args[1:]
        # A view of a lasting stack with hashable arguments (reshape(1, -1, 1, 1) of a layer-scale, a slice of a
        # fused projection) is the same every call: keep it for the engine's lifetime instead of vmapping again.
        key = None
        if self.engine.is_lasting(st) and len(self.engine.views) < _MAX_CACHED_VIEWS:
            key = (id(st.placeholder), func, attr, rest, tuple(sorted(kwargs.items())))
            try:
                hit = self.engine.views.get(key)
            except TypeError:  # unhashable arguments
                key, hit = None, None
            if hit is not None:
                return hit

        def one(p):
            return func(p, *rest, **kwargs) if attr is None else func(p)

        out = torch.vmap(one)(st.parts)
        label = f".{attr}" if attr else f".{getattr(func, '__name__', 'view')}(...)"
        lasting = key is not None
        if isinstance(out, Tensor):
            result = self.new_stack(st, out, label, lasting)
        else:
            result = type(out)(self.new_stack(st, p, f"{label}[{i}]", lasting) for i, p in enumerate(out))
        if lasting:
            self.engine.views[key] = result
        return result

    # -- low-rank (LoRA) stacks -----------------------------------------------------------------------------
    def lora_coef(self, st: LowRankStack) -> Tensor:
        """``c[sources[i]] * scales[i]`` for this sample (batched inside vmap); source 0's coefficient is
        ``1 - sum_{s>0} c_s`` as for dense stacks."""
        key = ("lora", st.sources, id(st.scales))
        c = self.call.coef.get(key)
        if c is None:
            row = self.call.row
            full = torch.cat([1 - row[1:].sum(0, keepdim=True), row[1:]])
            idx = torch.tensor(st.sources, device=row.device)
            c = full.index_select(0, idx) * st.scales.to(full.dtype)
            self.call.coef[key] = c
            self.call.keep.append(st.scales)  # the id in the key stays unique while the call runs
        return c

    def _low_rank_name(self, st: LowRankStack) -> str:
        return f"{st.name!r} (LoRA-adapted, module {st.module!r})" if st.module else f"{st.name!r} (LoRA-adapted)"

    def materialize_low_rank(self, st: LowRankStack, op: str) -> Tensor:
        """The merged matrix of this sample, ``base + sum_i c_i B_i A_i`` (refused above 1M entries by _account)."""
        got = self.call.materialized.get(id(st))
        if got is not None:
            return got
        self._account(st, op)
        c = self.lora_coef(st).to(st.base.dtype)
        merged = st.base + torch.einsum("s,sor,sri->oi", c, st.lora_b, st.lora_a)
        self.call.materialized[id(st)] = merged
        return merged

    def _low_rank(self, func, op: str, attr, stacks, flat, spec, args, kwargs):
        first = next(s for s in stacks if isinstance(s, LowRankStack))
        only_one = stacks[0] is first and sum(s is not None for s in stacks) == 1
        if func in _IDENTITY_IF_SAME and only_one and func(first.ref, *args[1:], **kwargs) is first.ref:
            return first.placeholder
        if func in (F.linear, torch._C._nn.linear):
            a, k = list(args), dict(kwargs)
            x = a[0] if a else k.get("input")
            weight = a[1] if len(a) > 1 else k.get("weight")
            bias = a[2] if len(a) > 2 else k.get("bias")
            st = self.stack_of(weight)
            if isinstance(st, LowRankStack) and self.stack_of(x) is None:
                return self._lora_linear(x, st, bias)
        if func in _MATMUL and len(args) == 2 and not kwargs:
            x, other = args
            st = self.stack_of(other)
            if isinstance(st, LowRankStack) and self.stack_of(x) is None and x.dim() >= 1:
                # x @ P == F.linear(x, P^T), and P^T is low-rank too.
                return self._lora_linear(x, self._low_rank_transpose(st), None)
        only_first = stacks[0] is first and all(s is None for s in stacks[1:])
        unbatched_rest = not any(isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t) for t in flat[1:])
        if only_first and unbatched_rest and (func in _VIEW_FUNCS or attr in _VIEW_ATTRS):
            out = self._low_rank_view(func, first, args, kwargs, attr)
            if out is not None:
                return out
        # Any other use: the merged matrix itself, per sample (exact; refused above 1M entries).
        try:
            return self.call_on_merged(func, op, stacks, flat, spec)
        except RuntimeError as e:
            if "Batching rule not implemented" not in str(e):
                raise
            raise UnsupportedParameterError(
                f"{op} on {self._low_rank_name(first)} has no vmap batching rule, so it cannot run per sample; "
                "only F.linear / matmul, slices and transposes of a LoRA-adapted weight run batched"
            ) from e

    def _lora_linear(self, x, st: LowRankStack, bias):
        bst = self.stack_of(bias)
        if isinstance(bst, LowRankStack):
            raise UnsupportedParameterError(f"F.linear bias {self._low_rank_name(bst)} is a matrix")
        b = self.materialize(bst, "F.linear") if bst is not None else bias
        batched_bias = isinstance(b, Tensor) and torch._C._functorch.is_batchedtensor(b)
        if isinstance(b, Tensor) and (b.dtype != st.base.dtype or b.dim() != 1):
            batched_bias = True  # an odd bias (another dtype, broadcast shape): added after the op, like F.linear
        out = _lora_linear_op(x, st.base, None if batched_bias else b, st.lora_a, st.lora_b, self.lora_coef(st))
        return out + b if batched_bias else out

    def _derived_low_rank(self, st: LowRankStack, base, lora_a, lora_b, what: str) -> Tensor:
        ph = torch.empty(base.shape, dtype=base.dtype, device="meta")
        derived = LowRankStack(f"{st.name}{what}", base, lora_a, lora_b, st.scales, st.sources, ph, st.module)
        self.call.derived[id(ph)] = derived
        self.call.keep.append(ph)
        return ph

    def _low_rank_transpose(self, st: LowRankStack) -> LowRankStack:
        ph = self._derived_low_rank(
            st, st.base.t(), st.lora_b.transpose(1, 2), st.lora_a.transpose(1, 2), ".T"
        )  # (B A)^T = A^T B^T
        return self.call.derived[id(ph)]

    def _low_rank_view(self, func, st: LowRankStack, args, kwargs, attr):
        """A view of a low-rank matrix that selects rows and columns (slices, chunk, split, narrow) or also
        transposes them is low-rank again: ``W[rows][:, cols] = W0[rows][:, cols] + B[rows] A[:, cols]``. Found by
        applying the view to row- and column-index maps; other views return None (the caller materialises)."""
        n_out, n_in = st.base.shape
        dev = st.base.device
        rows = torch.arange(n_out, device=dev).view(-1, 1).expand(n_out, n_in).contiguous()
        cols = torch.arange(n_in, device=dev).view(1, -1).expand(n_out, n_in).contiguous()

        def one(p):
            return func(p, *args[1:], **kwargs) if attr is None else func(p)

        try:
            r_out, c_out, base_out = one(rows), one(cols), one(st.base)
        except (RuntimeError, TypeError, IndexError, ValueError):
            return None
        single = isinstance(r_out, Tensor)
        r_list, c_list, b_list = ([r_out], [c_out], [base_out]) if single else (r_out, c_out, base_out)
        label = f".{attr}" if attr else f".{getattr(func, '__name__', 'view')}(...)"
        outs = []
        for i, (r, c, base) in enumerate(zip(r_list, c_list, b_list, strict=True)):
            what = label if single else f"{label}[{i}]"
            if r.dim() != 2 or r.numel() == 0:
                return None
            if bool((r == r[:, :1]).all()) and bool((c == c[:1, :]).all()):
                ri, ci = r[:, 0], c[0, :]
                la = st.lora_a.index_select(2, ci)
                lb = st.lora_b.transpose(1, 2).index_select(2, ri).contiguous().transpose(1, 2)
            elif bool((r == r[:1, :]).all()) and bool((c == c[:, :1]).all()):
                ri, ci = r[0, :], c[:, 0]  # transposed: result[i, j] = W[ri[j], ci[i]]
                la = st.lora_b.index_select(1, ri).transpose(1, 2)
                lb = st.lora_a.index_select(2, ci).transpose(1, 2)
            else:
                return None
            outs.append(self._derived_low_rank(st, base, la, lb, what))
        return outs[0] if single else type(r_out)(outs)

    # -- kernels ---------------------------------------------------------------------------------------------
    def linear(self, x, weight, bias=None):
        st = self.stack_of(weight)
        if st is None or st.parts.dim() != 3:
            return NotImplemented
        x = self._resolve(x, "F.linear")
        biases, _ = self._fusable_biases(st, bias)
        out = self._samplewise_linear(x, st, biases)
        if bias is not None and biases is None:
            out = out + self._resolve(bias, "F.linear")
        return out

    def _fusable_biases(self, st: Stack, bias) -> tuple[Tensor | None, bool]:
        """``bias`` as the ``[G, OUT]`` biases the kernels add with the weight's rows ``[1, c_a, ...]`` (None when it
        cannot be fused), and whether they live as long as the engine. Fusable: a stack with the weight's active
        sources (its parts), or a bias shared by every sample (``[b, 0, ...]``: the kernel adds b exactly, sparing a
        pass over the output)."""
        if bias is None:
            return None, True
        bst = self.stack_of(bias)
        if bst is not None:
            if bst.active == st.active and bst.parts.dtype == st.parts.dtype:
                return bst.parts, self.engine.is_lasting(bst)
            return None, True
        if (
            not isinstance(bias, Tensor)
            or bias.dim() != 1
            or bias.dtype != st.parts.dtype
            or bias.device != st.parts.device
            or bias.shape[0] != st.parts.shape[1]
            or torch._C._functorch.is_batchedtensor(bias)
            or (bias.requires_grad and torch.is_grad_enabled())
        ):
            return None, True
        key = (id(bias), st.parts.shape[0])
        got = self.engine.shared_bias_parts.get(key)
        if got is not None and got[0] is bias:
            return got[1], True
        parts = torch.cat([bias.detach().unsqueeze(0), bias.new_zeros(st.parts.shape[0] - 1, bias.shape[0])])
        lasting = id(bias) in self.engine.shared_names  # the module's own tensor: lives as long as the engine
        if lasting:
            self.engine.shared_bias_parts[key] = (bias, parts)
        return parts, lasting

    def _samplewise_linear(self, x: Tensor, st: Stack, biases: Tensor | None, parts: Tensor | None = None):
        """``F.linear(x, merged weight)`` per sample: the whole batch in one samplewise_linear call."""
        parts = st.parts if parts is None else parts
        xp = self.physical(x)
        if xp is None:
            return _linear_op(x, parts, biases, self.coef(st))
        vector = xp.dim() == 2  # per-sample x is [IN]
        out = _ops.samplewise_linear(xp.unsqueeze(1) if vector else xp, parts, biases, self.coef_rows(st))
        return self.wrap(out.squeeze(1) if vector else out)

    def matmul(self, x, other, *, out=None):
        st = self.stack_of(other)
        if out is not None or st is None or st.parts.dim() != 3 or self.stack_of(x) is not None or x.dim() < 1:
            return NotImplemented
        # x @ P == F.linear(x, P^T): the transposed parts are a view.
        return self._samplewise_linear(x, st, None, st.parts.transpose(1, 2))

    def conv(self, nd: int, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        st = self.stack_of(weight)
        if st is None:
            return NotImplemented
        x = self._resolve(x, f"F.conv{nd}d")

        def lst(v):
            return [int(v)] * nd if isinstance(v, int) else [int(i) for i in v]

        pad_str = padding if isinstance(padding, str) else ""
        pad = [0] * nd if isinstance(padding, str) else lst(padding)
        biases, lasting = self._fusable_biases(st, bias)
        fused = biases is not None
        xp = self.physical(x)
        if xp is None:
            out = _conv_op(x, st.parts, biases, self.coef(st), lst(stride), pad, pad_str, lst(dilation), groups)
        else:
            xb, rows, lead = _fold_batch(xp, 0, self.coef_rows(st), 0, self.call.batch, nd + 1)
            args = (xb, biases, lasting, lst(stride), pad_str or pad, lst(dilation), groups)
            y = self._conv_plan(st, *args)(xb, rows)
            out = self.wrap(y.reshape(self.call.batch, *lead, *y.shape[1:]))
        if bias is not None and not fused:
            b = self._resolve(bias, f"F.conv{nd}d")
            out = out + b.view(-1, *([1] * nd))
        return out

    def _conv_plan(
        self, st: Stack, xb: Tensor, biases, biases_lasting: bool, stride, padding, dilation, groups
    ) -> ConvPlan:
        """samplewise_conv's plan for this layer and input shape: kept for the engine's lifetime when the weights and
        biases are (a layer's route, padding, tap crop and weight layout are the same every call)."""
        grad = torch.is_grad_enabled()
        key = None
        fused = id(biases) if biases is not None else None  # the plan holds the biases: key on which ones
        if self.engine.is_lasting(st) and biases_lasting and len(self.engine.conv_plans) < _MAX_CACHED_VIEWS:
            # Not the batch size: a plan serves any batch, and a server sees many.
            key = (id(st.placeholder), fused, tuple(xb.shape[1:]), xb.dtype, xb.device, str(padding), tuple(stride))
            key = (*key, tuple(dilation), groups, grad)
            plan = self.engine.conv_plans.get(key)
            if plan is not None:
                return plan
        needs_grad = grad and (xb.requires_grad or st.parts.requires_grad)
        plan = samplewise_conv_plan(xb, st.parts, biases, stride, padding, dilation, groups, needs_grad=needs_grad)
        if key is not None:
            self.engine.conv_plans[key] = plan
        return plan

    def embedding(
        self, input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False
    ):  # noqa: E501
        st = self.stack_of(weight)
        if st is None:
            return NotImplemented
        if max_norm is not None:
            raise InPlaceUpdateError(
                f"F.embedding with max_norm renormalises {st.name!r} in place; not supported in exact mode"
            )
        idx = self._resolve(input, "F.embedding")
        c = self.coef(st)
        out = None
        for g in range(st.parts.shape[0]):
            part = F.embedding(idx, st.parts[g])
            out = part if g == 0 else out + c[g].to(part.dtype) * part
        return out

    def batch_norm(
        self, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
    ):
        """Eval-mode batch norm with varying statistics or affine: ``x * scale + shift`` with the per-sample
        ``scale = w / sqrt(var + eps)``, ``shift = b - mean * scale`` (the same affine map batch_norm applies)."""
        if training or running_mean is None or running_var is None:
            return NotImplemented  # training mode is refused by the engine before the call
        given = (running_mean, running_var, weight, bias)
        if self.stack_of(input) is None and torch._C._functorch.is_batchedtensor(input):
            xp = self.physical(input)
            stats = [self.rows_of(t, "F.batch_norm") for t in given]
            if (
                xp is not None
                and xp.dim() >= 2
                and all(r is not None or t is None for r, t in zip(stats, given, strict=True))
            ):
                return self.wrap(_batch_norm_rows(xp, *stats, eps))
        if not any(self.stack_of(t) is not None for t in given):
            return NotImplemented  # an unbatched input with shared statistics: the stock call
        x = self._resolve(input, "F.batch_norm")
        mean = self._resolve(running_mean, "F.batch_norm")
        var = self._resolve(running_var, "F.batch_norm")
        w = self._resolve(weight, "F.batch_norm") if weight is not None else None
        b = self._resolve(bias, "F.batch_norm") if bias is not None else None
        scale, shift = _batch_norm_affine(mean, var, w, b, eps)
        shape = (-1,) + (1,) * (x.dim() - 2) if x.dim() >= 2 else (-1,)
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))

    def layer_norm(self, input, normalized_shape, weight=None, bias=None, eps=1e-5):
        """Layer norm of the whole batch outside vmap: the stock kernel (with the affine when it is shared), then a
        per-sample affine when the weight or bias differs between sources (vmap's rule took more passes)."""
        if self.stack_of(input) is not None or not torch._C._functorch.is_batchedtensor(input):
            return NotImplemented
        xp = self.physical(input)
        w, b = self.rows_of(weight, "F.layer_norm"), self.rows_of(bias, "F.layer_norm")
        if xp is None or (weight is not None and w is None) or (bias is not None and b is None):
            return NotImplemented
        ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if all(t is None or t.dim() == len(ns) for t in (w, b)):
            return self.wrap(F.layer_norm(xp, ns, w, b, eps))
        y = F.layer_norm(xp, ns, None, None, eps)
        lead = xp.dim() - 1 - len(ns)

        def per_sample(t):
            t = t.to(y.dtype)
            return t if t.dim() == len(ns) else t.view(t.shape[0], *([1] * lead), *ns)

        if w is not None and b is not None:
            y = torch.addcmul(per_sample(b), y, per_sample(w))
        elif w is not None:
            y = y * per_sample(w)
        elif b is not None:
            y = y + per_sample(b)
        return self.wrap(y)

    def mha(self, *args, **kwargs):
        with self:  # the body's own F.linear / split calls come back here
            return _MHA_BODY(*args, **kwargs)


_HANDLERS: dict[Callable, Callable] = {
    F.linear: ExactMode.linear,
    torch._C._nn.linear: ExactMode.linear,
    F.embedding: ExactMode.embedding,
    F.batch_norm: ExactMode.batch_norm,
    F.layer_norm: ExactMode.layer_norm,
    F.multi_head_attention_forward: ExactMode.mha,
    **{f: (lambda self, *a, _n=n, **k: ExactMode.conv(self, _n, *a, **k)) for f, n in _CONV.items()},
    **dict.fromkeys(_MATMUL, ExactMode.matmul),
}


# --------------------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------------------
_MAX_CACHED_VIEWS = 4096  # views with call-dependent arguments must not grow the cache without bound
_GLOBAL_STATE_LOCK = threading.RLock()  # re-entrant: a module may run another engine inside
_FALLBACK_PREFIX = "There is a performance drop because we have not yet implemented the batching rule for "
_WARNED_OPS: set[str] = set()


class Engine:
    """Runs methods of ``module`` (whose varying tensors are already placeholders) per sample."""

    def __init__(self, module: torch.nn.Module, stacks: dict[str, Stack], budget: int, strict: bool) -> None:
        self.module = module
        self.stacks = stacks
        self.stacks_by_id = {id(s.placeholder): s for s in stacks.values()}
        self.views: dict[tuple, Tensor | tuple] = {}  # lasting views of lasting stacks (see ExactMode._view)
        self.conv_plans: dict[tuple, ConvPlan] = {}  # samplewise_conv's plans per layer and input shape
        self.shared_bias_parts: dict[tuple, tuple[Tensor, Tensor]] = {}  # see ExactMode._fusable_biases
        self.group_members: list[Stack] = []  # small parameters merged by one addmm per call (see _MergeGroup)
        self.group_of: dict[int, _MergeGroup] = {}
        self.pending_group_members: list[Stack] = []
        self.budget = int(budget)
        self.strict = bool(strict)
        self.shared_names = {id(t): n for n, t in module.named_parameters(remove_duplicate=False)}
        self.shared_names.update({id(t): n for n, t in module.named_buffers(remove_duplicate=False) if t is not None})
        self.shared_names = {k: v for k, v in self.shared_names.items() if v not in stacks}
        self.last_materialized: list[tuple[str, tuple[int, ...]]] = []
        # The engine's module is its own copy, so its submodules and tensors are fixed: list them once.
        self.named_modules = list(module.named_modules())
        self.shared_tensors = self._shared_tensors()

    def merge_group_of(self, st: Stack) -> _MergeGroup | None:
        """The merge group holding ``st`` (see :class:`_MergeGroup`), or None."""
        return self.group_of.get(id(st))

    def note_small_merge(self, st: Stack) -> None:
        """Records a small lasting parameter merged on its own; :meth:`update_merge_groups` adds it to its group."""
        if st.parts.numel() // st.parts.shape[0] <= _GROUP_MAX_NUMEL and self.is_lasting(st):
            self.pending_group_members.append(st)

    def update_merge_groups(self) -> None:
        """Rebuilds the groups that gained members in the last call (concatenating their sources once)."""
        if not self.pending_group_members:
            return
        by_key: dict[tuple, list[Stack]] = {}
        for st in [*self.group_members, *self.pending_group_members]:
            key = (st.active, st.parts.dtype, st.parts.device)
            members = by_key.setdefault(key, [])
            if all(m is not st for m in members):
                members.append(st)
        self.pending_group_members = []
        self.group_members, self.group_of = [], {}
        for key, members in by_key.items():
            flat = torch.cat([m.flat for m in members], 1)
            slots, start = {}, 0
            for m in members:
                n = m.flat.shape[1]
                slots[id(m)] = (start, n)
                start += n
            group = _MergeGroup(key, flat[:1], flat[1:], slots)
            self.group_members += members
            self.group_of.update(dict.fromkeys((id(m) for m in members), group))

    def is_lasting(self, st: Stack) -> bool:
        """Whether ``st`` lives as long as the engine (a parameter's stack or a cached view of one)."""
        return self.stacks_by_id.get(id(st.placeholder)) is st

    def add_low_rank_stacks(self, stacks: dict[str, LowRankStack]) -> None:
        """Registers :class:`LowRankStack` s whose placeholders the caller has installed in ``self.module``."""
        for name, st in stacks.items():
            self.stacks[name] = st
            self.stacks_by_id[id(st.placeholder)] = st
        self.shared_names = {k: v for k, v in self.shared_names.items() if v not in stacks}

    def note_loop(self, op: str) -> None:
        if self.strict:
            raise NoBatchingRuleError(
                f"op {op} has no vmap batching rule, so it would run as a per-sample loop (strict=True refuses "
                "this; pass strict=False to accept the slow exact loop)"
            )
        if op not in _WARNED_OPS:
            _WARNED_OPS.add(op)
            warnings.warn(
                f"exact mode: op {op} has no vmap batching rule and runs as a per-sample loop (exact, but slow); "
                "strict=True raises instead",
                NoBatchingRuleWarning,
                stacklevel=4,
            )

    def _shared_tensors(self) -> list[tuple[str, Tensor]]:
        out = [(n, t) for n, t in self.module.named_parameters() if n not in self.stacks]
        out += [(n, t) for n, t in self.module.named_buffers() if t is not None and n not in self.stacks]
        return out

    def run(self, fn: Callable, rows: Tensor, args: tuple, kwargs: dict, in_dims, out_dims: int):
        """``fn(*args, **kwargs)`` for every sample ``b`` with the parameters ``sum_s rows[b, s] theta_s``."""
        for name, m in self.named_modules:
            if m.training:
                raise RuntimeError(
                    f"module {name or type(m).__name__!r} is in training mode: the exact mode is inference only "
                    "(call .eval())"
                )
        batch = rows.shape[0]
        flat, spec = pytree.tree_flatten((args, kwargs))
        dims = _batch_dims(args, kwargs, flat, spec, batch, in_dims)
        batched_idx = [i for i, d in enumerate(dims) if d is not None]
        batched = [flat[i].movedim(dims[i], 0).unsqueeze(dims[i] + 1) for i in batched_idx]
        out_info: dict = {}

        def per_sample(row, *leaves):
            new = list(flat)
            for i, leaf in zip(batched_idx, leaves, strict=True):
                new[i] = leaf
            a, k = pytree.tree_unflatten(new, spec)
            call = _Call(row, rows, batch, self.budget)
            with ExactMode(self, call):
                out = fn(*a, **k)
            self.last_materialized = call.log
            out_flat, out_spec = pytree.tree_flatten(out)
            tensors = [i for i, t in enumerate(out_flat) if isinstance(t, Tensor)]
            out_info["spec"], out_info["flat"], out_info["tensors"] = out_spec, out_flat, tensors
            out_info["batched"] = [torch._C._functorch.is_batchedtensor(out_flat[i]) for i in tensors]
            for i in tensors:
                if out_flat[i].is_meta:
                    raise RuntimeError(
                        "the module returned a placeholder of a varying parameter as an output; return a "
                        "computed value instead"
                    )
            return tuple(out_flat[i] for i in tensors)

        # Inference tensors have no version counter; in-place ops on them are still caught by the mode.
        versions = [(n, t, t._version) for n, t in self.shared_tensors if not t.is_inference()]
        # The engine switches process-wide state during the vmapped call: vmap's fallback warning (how ops without
        # a batching rule are found), warnings.catch_warnings, and torch.backends.mha's fast path (off, so that
        # nn.TransformerEncoder does not build nested tensors, which have no batching rule, before its own
        # has_torch_function check). Engine calls therefore hold one lock: calls from several threads are
        # serialised and give the answers of sequential calls. (A plain TransformerEncoder running in another
        # thread meanwhile takes its slower unfused path: the same numbers.)
        with _GLOBAL_STATE_LOCK:
            outs, caught = self._vmapped(per_sample, rows, batched)
            self.update_merge_groups()
        for w in caught:
            msg = str(w.message)
            if msg.startswith(_FALLBACK_PREFIX):
                op = msg[len(_FALLBACK_PREFIX) :].split(".")[0]
                if op not in _WARNED_OPS:
                    _WARNED_OPS.add(op)
                    warnings.warn(
                        f"exact mode: op {op} has no vmap batching rule and runs as a per-sample loop (exact, but "
                        "slow); strict=True raises instead",
                        NoBatchingRuleWarning,
                        stacklevel=3,
                    )
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for name, t, v in versions:
            if t._version != v:
                raise InPlaceUpdateError(
                    f"{name!r} of the module was modified in place during the forward pass (e.g. BatchNorm in "
                    "training mode); the exact mode is inference only"
                )
        out_flat = list(out_info["flat"])
        for pos, (i, was_batched) in enumerate(zip(out_info["tensors"], out_info["batched"], strict=True)):
            out_flat[i] = _unbatch_output(outs[pos], was_batched, out_dims, i)
        return pytree.tree_unflatten(out_flat, out_info["spec"])

    def _vmapped(self, per_sample: Callable, rows: Tensor, batched: list[Tensor]):
        """The vmapped call with vmap's fallback warning on (holding _GLOBAL_STATE_LOCK): (outputs, warnings)."""
        torch._C._functorch._set_vmap_fallback_warning_enabled(True)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if self.strict:
                    warnings.filterwarnings("error", message=_FALLBACK_PREFIX + ".*")
                try:
                    with torch.no_grad():
                        outs = torch.vmap(per_sample, in_dims=(0, *([0] * len(batched))))(rows, *batched)
                except UserWarning as w:
                    op = str(w)[len(_FALLBACK_PREFIX) :].split(".")[0] if str(w).startswith(_FALLBACK_PREFIX) else "?"
                    raise NoBatchingRuleError(
                        f"op {op} has no vmap batching rule, so it would run as a per-sample loop "
                        "(strict=True refuses this; pass strict=False to accept the slow exact loop)"
                    ) from None
                except RuntimeError as e:
                    if "data-dependent control flow" in str(e):
                        raise DataDependentControlFlowError(
                            "Python control flow on a value that differs between samples (a parameter that differs "
                            f"between sources, or the input) inside the module's code: {e}"
                        ) from e
                    raise
        finally:
            torch._C._functorch._set_vmap_fallback_warning_enabled(False)  # torch's default
            torch.backends.mha.set_fastpath_enabled(fastpath)
        return outs, list(caught)


def _unbatch_output(t: Tensor, was_batched: bool, out_dims: int, index: int) -> Tensor:
    if not was_batched:
        return t[0]  # the same for every sample
    per = t.shape[1:]
    if len(per) == 0:
        return t
    d = out_dims
    if d >= len(per) or per[d] != 1:
        raise ValueError(
            f"output {index} has per-sample shape {tuple(per)}: expected size 1 at dim {d} (the batch of one "
            "sample). Pass out_dims=<the dim that holds the batch> to coefficients()/call()."
        )
    return t.squeeze(d + 1).movedim(0, d)


def _batch_dims(args, kwargs, flat, spec, batch: int, in_dims) -> list[int | None]:
    """The batch dim of every input leaf: declared (in_dims) or inferred (size == batch at dim 0)."""
    declared: dict[int, int | None] = {}
    if in_dims is not None:
        if not isinstance(in_dims, dict):
            raise TypeError("in_dims must be a dict {positional index or keyword name: batch dim or None}")
        # Map each declared argument to the leaves it holds.
        arg_flat = [pytree.tree_flatten(a)[0] for a in args]
        start = 0
        starts = []
        for leaves in arg_flat:
            starts.append(start)
            start += len(leaves)
        kw_starts = {}
        for name in kwargs:
            kw_starts[name] = start
            start += len(pytree.tree_flatten(kwargs[name])[0])
        for key, d in in_dims.items():
            if isinstance(key, int):
                if key >= len(args):
                    raise ValueError(f"in_dims: positional argument {key} was not given")
                n0, n = starts[key], len(arg_flat[key])
            else:
                if key not in kwargs:
                    raise ValueError(f"in_dims: keyword argument {key!r} was not given")
                n0, n = kw_starts[key], len(pytree.tree_flatten(kwargs[key])[0])
            for j in range(n0, n0 + n):
                declared[j] = d
    dims: list[int | None] = []
    for j, t in enumerate(flat):
        if not isinstance(t, Tensor):
            dims.append(None)
            continue
        if j in declared:
            d = declared[j]
            if d is not None and (t.dim() <= d or t.shape[d] != batch):
                raise ValueError(
                    f"in_dims declares dim {d} of input leaf {j} (shape {tuple(t.shape)}) as the batch, "
                    f"but the coefficients have {batch} rows"
                )
            dims.append(d)
            continue
        if t.dim() >= 1 and t.shape[0] == batch:
            if j != 0 and batch > 1 and t.dim() == 2 and t.shape[1] == batch:
                raise ValueError(
                    f"input leaf {j} has shape {tuple(t.shape)}: a square [B, B] input could be a per-sample row "
                    "or a shared [L, L] mask, so its batch dim is ambiguous; declare it with "
                    "coefficients(c, in_dims={arg: 0 or None})"
                )
            dims.append(0)
        else:
            dims.append(None)
    return dims


def placeholder_for(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")
