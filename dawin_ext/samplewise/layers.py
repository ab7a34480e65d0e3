"""Sample-wise replacements for the parametrised layers of a network.

Every layer here computes, for sample ``b`` of the batch, exactly what the stock layer computes with the
parameters ``sum_s c[b, s] * theta_s``. Two tools do it:

* matrices (linear, convolution, attention projections, embeddings): one GEMM on the stacked
  ``[W0; W_a - W0; ...]`` produces the partial outputs side by side, then :func:`combine` blends them per
  sample with the row ``[1, c_a, ...]``. This is exact because the op is linear in (weight, bias) jointly.
  Linear maps on the CPU instead form each sample's merged weights block by block inside the GEMM
  (:func:`dawin_ext.samplewise_linear`), which costs about one GEMM instead of 1 + |active|.
* vectors (LayerNorm / BatchNorm affine and statistics, class token, positional embedding): the merged
  parameter itself is cheap to build per sample (``[B, numel]``), so it is built and applied directly.

Only sources whose tensor differs from source 0 take part ("active" sources), so a layer that is
identical in all sources costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _ops, sample_combine, samplewise_linear_cpu_path, samplewise_linear_weights

__all__ = [
    "CoefficientState",
    "AffineStack",
    "VectorStack",
    "combine",
    "SampleWiseLinear",
    "SampleWiseConv2d",
    "SampleWiseLayerNorm",
    "SampleWiseBatchNorm2d",
    "SampleWiseEmbedding",
    "SampleWiseMultiheadAttention",
    "SampleWiseLayerScale",
]

# How the per-sample combination of partial outputs is done: "kernel" = dawin_ext.sample_combine,
# "torch" = addcmul chain. Chosen by measurement (see benchmarks/test_bench_samplewise.py).
COMBINE_STRATEGIES = ("kernel", "torch")


class CoefficientState:
    """The coefficient rows of the forward pass in progress, shared by every sample-wise layer of one model."""

    def __init__(self, num_sources: int, combine: str = "torch") -> None:
        if combine not in COMBINE_STRATEGIES:
            raise ValueError(f"combine must be one of {COMBINE_STRATEGIES}, got {combine!r}")
        self.num_sources = num_sources
        self.combine = combine
        self._rows: Tensor | None = None
        self._cache: dict[tuple[str, tuple[int, ...]], Tensor] = {}

    def set(self, rows: Tensor | None) -> None:
        """Installs validated ``[B, S]`` float32 rows (or clears them with None)."""
        self._rows = rows
        self._cache = {}

    @property
    def rows(self) -> Tensor:
        if self._rows is None:
            raise RuntimeError(
                "sample-wise layer called without coefficients: call it through SampleWiseInterpolator.forward "
                "(or inside SampleWiseInterpolator.coefficients(...))"
            )
        return self._rows

    @property
    def batch(self) -> int:
        return self.rows.shape[0]

    def deltas(self, active: tuple[int, ...]) -> Tensor:
        """``[B, |active|]``: the coefficients of the active sources' deltas."""
        key = ("d", active)
        if key not in self._cache:
            self._cache[key] = self.rows[:, list(active)].contiguous()
        return self._cache[key]

    def combine_weights(self, active: tuple[int, ...]) -> Tensor:
        """``[B, 1 + |active|]`` = ``[1, c_a, ...]``: the weights of ``[W0, W_a - W0, ...]``.

        W0's weight is exactly 1 because rows sum to 1: sum_s c_s W_s = W0 + sum_{s>0} c_s (W_s - W0).
        """
        key = ("w", active)
        if key not in self._cache:
            d = self.deltas(active)
            self._cache[key] = torch.cat([torch.ones_like(d[:, :1]), d], dim=1).contiguous()
        return self._cache[key]

    def check_batch(self, size: int, where: str, dim: int = 0) -> None:
        if size != self.batch:
            raise ValueError(
                f"{where}: input has size {size} along batch dim {dim} but the coefficients have "
                f"{self.batch} rows; every input must be batch-major (one coefficient row per sample)"
            )


def combine(partials: Tensor, weights: Tensor, strategy: str) -> Tensor:
    """``partials`` ``[B, M, G, N]``, ``weights`` ``[B, G]`` -> ``[B, M, N]`` = sum_g weights[b, g] partials[b, :, g]."""
    if strategy == "kernel":
        return sample_combine(partials, weights)
    w = weights.to(partials.dtype)
    out = torch.addcmul(partials[:, :, 0], partials[:, :, 1], w[:, 1, None, None])
    for g in range(2, partials.shape[2]):
        out.addcmul_(partials[:, :, g], w[:, g, None, None])
    return out


def _differs(a: Tensor, b: Tensor) -> bool:
    return not torch.equal(a, b)


def _active(per_source: Sequence[Sequence[Tensor | None]]) -> tuple[int, ...]:
    """Indices s > 0 where any of the given tensors differs from source 0's."""
    first = per_source[0]
    return tuple(
        s
        for s in range(1, len(per_source))
        if any(t is not None and _differs(t, t0) for t, t0 in zip(per_source[s], first, strict=True))
    )


# Smaller weights are overhead-bound: the stacked layouts' single GEMM call wins there (a 10x64 head at batch
# 540: 60 us stacked vs 168 us through samplewise_linear on the 2-core dev VM).
_SAMPLE_MODE_MIN_NUMEL = 4096


def _sample_mode_pays(w0: Tensor) -> bool:
    """Per-sample weight mixing (``"sample"`` mode) is the faster choice: fp32 on a CPU with brgemm, not tiny."""
    return (
        w0.dim() == 2
        and w0.numel() >= _SAMPLE_MODE_MIN_NUMEL
        and w0.device.type == "cpu"
        and w0.dtype == torch.float32
        and samplewise_linear_cpu_path() == "brgemm"
    )


class AffineStack(nn.Module):
    """One GEMM for a per-sample interpolated linear map ``y[b] = x[b] @ W(c_b)^T + bias(c_b)``.

    Three layouts of the same exact sum ``W(c) = W0 + sum_a c_a (W_a - W0)``:

    * ``"sample"`` (the default for fp32 2-D weights of 4096+ entries on a CPU with brgemm): ``[W0, D_a, ...]``
      stored as ``[G, K, N]`` and :func:`dawin_ext.samplewise_linear` merges each sample's weights block
      by block in cache, about one GEMM's cost instead of G. Under autograd it computes the G partial
      outputs with differentiable matmuls instead (same result).

    Otherwise the smaller side picks between:

    * ``"out"``: weight ``[W0; D_a; ...]`` stacked along outputs -> partial outputs ``[.., G, N]``, then
      :func:`combine` with ``[1, c_a, ...]`` per sample (one extra pass over G*N outputs).
    * ``"in"``: weight ``[W0 | D_a | ... | Db_a ...]`` stacked along inputs, and the input ``[x, c_a x, ..., c_a]``
      -> the GEMM itself sums the G terms (and the bias deltas through the trailing ``c_a`` columns). Costs one
      pass over G*K inputs instead, so it wins when K < N (qkv and MLP up-projections).

    ``weights[s]`` / ``biases[s]`` are source s's tensors (output dim first). Inactive sources are dropped.
    """

    def __init__(
        self,
        weights: Sequence[Tensor],
        biases: Sequence[Tensor] | None,
        state: CoefficientState,
        name: str,
        mode: str | None = None,
    ) -> None:
        super().__init__()
        self.state = state
        self.name = name
        bias_list = list(biases) if biases is not None else [None] * len(weights)
        self.active = _active([(w, b) for w, b in zip(weights, bias_list, strict=True)])
        w0 = weights[0].detach()
        self.out_features, self.in_features = w0.shape[0], w0.shape[1]
        if mode is None and _sample_mode_pays(w0):
            mode = "sample"
        elif mode is None:
            mode = "in" if self.in_features < self.out_features else "out"
        if mode == "sample" and w0.dim() != 2:
            raise ValueError(f"{name}: 'sample' mode needs a 2-D (linear) weight, got shape {tuple(w0.shape)}")
        self.mode = mode if self.active else "out"
        deltas = [weights[s].detach() - w0 for s in self.active]
        bdeltas = [biases[s].detach() - biases[0].detach() for s in self.active] if biases is not None else []
        if self.mode == "sample":
            self.register_buffer("weight", samplewise_linear_weights([w0, *deltas]))
            bias = torch.stack([biases[0].detach(), *bdeltas], 0) if biases is not None else None
        elif self.mode == "out":
            self.register_buffer("weight", torch.cat([w0, *deltas], 0))
            bias = torch.cat([biases[0].detach(), *bdeltas], 0) if biases is not None else None
        else:
            cols = [w0, *deltas]
            if w0.dim() == 2 and bdeltas:
                cols += [torch.stack(bdeltas, 1)]  # multiplied by the trailing c_a input columns
            self.register_buffer("weight", torch.cat(cols, 1))
            bias = biases[0].detach().clone() if biases is not None else None
            if w0.dim() > 2 and bdeltas:  # conv: zero padding would spoil constant columns, add per sample
                self.register_buffer("bias_delta", torch.stack(bdeltas, 0))
        self.register_buffer("bias", bias)
        if not hasattr(self, "bias_delta"):
            self.bias_delta = None

    @property
    def groups(self) -> int:
        return 1 + len(self.active)

    def base_weight(self) -> Tensor:
        """Source 0's weight (a view), for code that inspects ``.weight`` (dtype, device, shape)."""
        if self.mode == "sample":
            return self.weight[0]
        if self.mode == "out":
            return self.weight[: self.out_features]
        return self.weight[:, : self.in_features]

    def base_bias(self) -> Tensor | None:
        if self.bias is None:
            return None
        return self.bias[0] if self.mode == "sample" else self.bias[: self.out_features]

    def sliced(self, start: int, end: int) -> AffineStack:
        """The stack of output rows ``[start, end)`` (views, no copies), e.g. q/k/v of a packed projection."""
        part = AffineStack.__new__(AffineStack)
        nn.Module.__init__(part)
        part.state, part.active, part.mode = self.state, self.active, self.mode
        part.name = f"{self.name}[{start}:{end}]"
        part.out_features, part.in_features = end - start, self.in_features
        if self.mode == "sample":
            w = self.weight[:, start:end]  # keeps unit stride along outputs: the kernel reads it in place
            b = None if self.bias is None else self.bias[:, start:end]
        elif self.mode == "out":
            g = self.groups
            w = self.weight.view(g, self.out_features, -1)[:, start:end].reshape(g * (end - start), -1)
            b = None if self.bias is None else self.bias.view(g, -1)[:, start:end].reshape(-1)
        else:
            w, b = self.weight[start:end], None if self.bias is None else self.bias[start:end]
        part.register_buffer("weight", w)
        part.register_buffer("bias", b)
        part.bias_delta = None
        return part

    def combine_channels(self, y: Tensor, batch: int, channel_dim_last: bool) -> Tensor:
        """Blends the G partial outputs of ``y`` per sample ("out" mode).

        ``y`` is ``[B, ..., G*N]`` when ``channel_dim_last`` else ``[B, G*N, ...]``; returns the same layout with N.
        """
        if not self.active:
            return y
        g, n = self.groups, self.out_features
        if channel_dim_last:
            lead = y.shape[:-1]
            out = combine(y.reshape(batch, -1, g, n), self.state.combine_weights(self.active), self.state.combine)
            return out.view(*lead, n)
        rest = y.shape[2:]
        out = combine(y.reshape(batch, 1, g, -1), self.state.combine_weights(self.active), self.state.combine)
        return out.view(batch, n, *rest)

    def expand_input(self, x: Tensor, channel_dim_last: bool, bias_columns: bool) -> Tensor:
        """``[x, c_a x, ...]`` along the channel dim ("in" mode), plus trailing ``c_a`` columns for bias deltas."""
        b, g = x.shape[0], self.groups
        c = self.state.deltas(self.active).to(x.dtype)
        # Written in place into one buffer, except under autograd (out= ops do not record gradients).
        differentiable = torch.is_grad_enabled() and x.requires_grad
        if channel_dim_last:
            k = x.shape[-1]
            x3 = x.reshape(b, -1, k)
            m = x3.shape[1]
            extra = len(self.active) if bias_columns else 0
            if differentiable:
                parts = [x3, (x3.unsqueeze(2) * c.view(b, 1, g - 1, 1)).flatten(2)]
                if extra:
                    parts.append(c.view(b, 1, g - 1).expand(b, m, g - 1))
                return torch.cat(parts, -1).view(*x.shape[:-1], g * k + extra)
            xp = x.new_empty(b, m, g * k + extra)
            xg = xp[..., : g * k].unflatten(-1, (g, k))
            xg[:, :, 0].copy_(x3)
            torch.mul(x3.unsqueeze(2), c.view(b, 1, g - 1, 1), out=xg[:, :, 1:])
            if extra:
                xp[..., g * k :].copy_(c.view(b, 1, g - 1).expand(b, m, g - 1))
            return xp.view(*x.shape[:-1], g * k + extra)
        cin = x.shape[1]
        cb = c.view(b, g - 1, *([1] * (x.dim() - 1)))
        if differentiable:
            return torch.cat([x.unsqueeze(1), x.unsqueeze(1) * cb], 1).view(b, g * cin, *x.shape[2:])
        xp = x.new_empty(b, g, *x.shape[1:])
        xp[:, 0].copy_(x)
        torch.mul(x.unsqueeze(1), cb, out=xp[:, 1:])
        return xp.view(b, g * cin, *x.shape[2:])

    def linear(self, x: Tensor) -> Tensor:
        """Per-sample ``x @ W(c)^T + b(c)`` for batch-major ``x`` ``[B, ..., K]``."""
        if x.dim() < 2:
            raise ValueError(f"{self.name}: expected a batched input [B, ..., features], got shape {tuple(x.shape)}")
        self.state.check_batch(x.shape[0], self.name)
        if self.mode == "sample":
            return self._sample_linear(x)
        if self.mode == "in":
            has_bias_cols = self.weight.shape[1] > self.groups * self.in_features
            return F.linear(self.expand_input(x, True, has_bias_cols), self.weight, self.bias)
        return self.combine_channels(F.linear(x, self.weight, self.bias), x.shape[0], channel_dim_last=True)

    def _sample_linear(self, x: Tensor) -> Tensor:
        w = self.state.combine_weights(self.active)
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return _ops.samplewise_linear(x, self.weight, self.bias, w)
        # Differentiable form of the same sum: G partial outputs, blended per sample.
        b, k = x.shape[0], x.shape[-1]
        parts = torch.matmul(x.reshape(b, 1, -1, k), self.weight.transpose(1, 2).unsqueeze(0))  # [B, G, M, N]
        if self.bias is not None:
            parts = parts + self.bias.view(1, self.groups, 1, -1)
        out = combine(parts.transpose(1, 2), w, self.state.combine)
        return out.view(*x.shape[:-1], self.out_features)


class VectorStack(nn.Module):
    """A small parameter merged per sample: ``P(c)[b] = P0 + sum_a c[b, a] (P_a - P0)`` -> ``[B, *shape]``."""

    def __init__(self, tensors: Sequence[Tensor], state: CoefficientState) -> None:
        super().__init__()
        self.state = state
        self.active = _active([(t,) for t in tensors])
        t0 = tensors[0].detach()
        self.shape = tuple(t0.shape)
        self.register_buffer("base", t0.clone())
        if self.active:
            self.register_buffer("delta", torch.stack([(tensors[s].detach() - t0).reshape(-1) for s in self.active], 0))
        else:
            self.delta = None

    @property
    def varies(self) -> bool:
        return bool(self.active)

    def merged(self) -> Tensor:
        """``[B, *shape]`` when the parameter varies, else the constant ``[*shape]`` (broadcasts)."""
        if not self.active:
            return self.base
        c = self.state.deltas(self.active).to(self.delta.dtype)
        return torch.addmm(self.base.reshape(1, -1), c, self.delta).view(-1, *self.shape)


def _per_source(sources: Sequence[dict[str, Tensor]], key: str) -> list[Tensor]:
    return [sd[key] for sd in sources]


def _maybe(sources: Sequence[dict[str, Tensor]], key: str) -> list[Tensor] | None:
    return _per_source(sources, key) if key in sources[0] else None


def _expand_to(p: Tensor, ndim: int, trailing: int) -> Tensor:
    """Views a ``[B, *trailing_shape]`` per-sample parameter so it broadcasts against an ``ndim``-d batch-major input."""
    if p.dim() == trailing:  # constant
        return p
    return p.view(p.shape[0], *([1] * (ndim - 1 - trailing)), *p.shape[1:])


class SampleWiseLinear(nn.Module):
    """nn.Linear with per-sample interpolated weight and bias (batch-major input)."""

    def __init__(self, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState) -> None:
        super().__init__()
        self.stack = AffineStack(
            _per_source(sources, prefix + "weight"), _maybe(sources, prefix + "bias"), state, prefix.rstrip(".")
        )

    @property
    def weight(self) -> Tensor:
        """Source 0's weight (a view), for callers that inspect ``.weight.dtype`` and the like."""
        return self.stack.base_weight()

    @property
    def bias(self) -> Tensor | None:
        return self.stack.base_bias()

    @property
    def in_features(self) -> int:
        return self.stack.in_features

    @property
    def out_features(self) -> int:
        return self.stack.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.stack.linear(x)


class SampleWiseConv2d(nn.Module):
    """nn.Conv2d with per-sample interpolated weight and bias: one convolution with stacked output channels."""

    def __init__(
        self, conv: nn.Conv2d, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState
    ) -> None:
        super().__init__()
        self.conv = conv  # holds the hyper-parameters; its own weight is replaced by the stack below
        self.name = prefix.rstrip(".")
        self.state = state
        weights = _per_source(sources, prefix + "weight")
        biases = _maybe(sources, prefix + "bias")
        # A patchify convolution (kernel == stride, no padding: ViT's patch embedding) is a linear map of each
        # patch, so it can use the per-sample mixing of linear layers where that pays.
        self.patchify = (
            conv.groups == 1
            and tuple(conv.kernel_size) == tuple(conv.stride)
            and tuple(conv.dilation) == (1, 1)
            and conv.padding in ((0, 0), "valid")
            and _sample_mode_pays(weights[0].reshape(weights[0].shape[0], -1))
        )
        if self.patchify:
            flat = [w.reshape(w.shape[0], -1) for w in weights]
            self.stack = AffineStack(flat, biases, state, self.name, "sample")
        else:
            # Stack along the smaller side per sample: inputs (~3 passes over G*Cin*H*W) or outputs
            # (~5 over G*Cout*H'*W').
            stride = conv.stride[0] * conv.stride[1]
            mode = "in" if conv.groups == 1 and 3 * conv.in_channels * stride < 5 * conv.out_channels else "out"
            self.stack = AffineStack(weights, biases, state, self.name, mode)
        # The stack owns the weights; drop the conv's copies so memory is not held twice.
        del self.conv.weight
        self.conv.register_buffer("weight", None)
        if self.conv.bias is not None:
            del self.conv.bias
            self.conv.register_buffer("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self.name}: expected a batched input [B, C, H, W], got shape {tuple(x.shape)}")
        self.state.check_batch(x.shape[0], self.name)
        st = self.stack
        if self.patchify:
            b, c, h, w = x.shape
            p, q = self.conv.kernel_size
            hp, wq = h // p, w // q  # a convolution drops the incomplete trailing patches too
            patches = x[:, :, : hp * p, : wq * q].reshape(b, c, hp, p, wq, q).permute(0, 2, 4, 1, 3, 5)
            y = st.linear(patches.reshape(b, hp * wq, c * p * q))  # [B, patches, Cout]
            return y.transpose(1, 2).reshape(b, -1, hp, wq)
        if st.mode == "in":
            y = self.conv._conv_forward(st.expand_input(x, False, False), st.weight, st.bias)
            if st.bias_delta is not None:
                c = self.state.deltas(st.active).to(st.bias_delta.dtype)
                y = y + (c @ st.bias_delta).to(y.dtype)[:, :, None, None]
            return y
        if self.conv.groups == 1 or not st.active:
            y = self.conv._conv_forward(x, st.weight, st.bias)
        else:
            # Stacking output channels would mix up the channel groups; convolve each block separately.
            n = st.out_features
            ys = [
                self.conv._conv_forward(
                    x, st.weight[g * n : (g + 1) * n], None if st.bias is None else st.bias[g * n : (g + 1) * n]
                )
                for g in range(st.groups)
            ]
            y = torch.cat(ys, 1)
        return st.combine_channels(y, x.shape[0], channel_dim_last=False)


class SampleWiseLayerNorm(nn.Module):
    """LayerNorm (torch's, or open_clip's LayerNorm / LayerNormFp32) with per-sample scale and shift."""

    def __init__(
        self, ln: nn.LayerNorm, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState
    ) -> None:
        super().__init__()
        self.name = prefix.rstrip(".")
        self.state = state
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        # open_clip's LayerNormFp32 normalises in float32 and casts back.
        self.fp32 = type(ln).__name__ == "LayerNormFp32"
        w, b = _maybe(sources, prefix + "weight"), _maybe(sources, prefix + "bias")
        self.weight = VectorStack(w, state) if w is not None else None
        self.bias = VectorStack(b, state) if b is not None else None

    def forward(self, x: Tensor) -> Tensor:
        self.state.check_batch(x.shape[0], self.name)
        orig = x.dtype
        if self.fp32:
            x = x.float()
        k = len(self.normalized_shape)
        w = _expand_to(self.weight.merged(), x.dim(), k) if self.weight is not None else None
        b = _expand_to(self.bias.merged(), x.dim(), k) if self.bias is not None else None
        w_varies = self.weight is not None and self.weight.varies
        b_varies = self.bias is not None and self.bias.varies
        if not w_varies and not b_varies:
            y = F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        else:
            y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
            if w is not None and b is not None:
                y = torch.addcmul(b.to(y.dtype), y, w.to(y.dtype))
            elif w is not None:
                y = y * w.to(y.dtype)
            elif b is not None:
                y = y + b.to(y.dtype)
        return y.to(orig)


class SampleWiseBatchNorm2d(nn.Module):
    """BatchNorm2d in eval mode with per-sample merged running statistics, scale and shift.

    The running statistics are merged like every other state-dict entry (as per-sample merging would do);
    they enter through 1/sqrt(var + eps), which is fine because they are per-channel vectors merged exactly.
    """

    def __init__(
        self, bn: nn.BatchNorm2d, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState
    ) -> None:
        super().__init__()
        self.name = prefix.rstrip(".")
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError(
                f"{self.name}: BatchNorm2d without running statistics normalises with batch statistics, which mixes "
                "samples; it cannot be computed per sample"
            )
        self.state = state
        self.eps = bn.eps
        self.mean = VectorStack(_per_source(sources, prefix + "running_mean"), state)
        self.var = VectorStack(_per_source(sources, prefix + "running_var"), state)
        w, b = _maybe(sources, prefix + "weight"), _maybe(sources, prefix + "bias")
        self.weight = VectorStack(w, state) if w is not None else None
        self.bias = VectorStack(b, state) if b is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError(
                f"{self.name}: BatchNorm2d in training mode uses batch statistics; the sample-wise interpolator "
                "is inference-only (call .eval())"
            )
        if x.dim() != 4:
            raise ValueError(f"{self.name}: expected [B, C, H, W], got shape {tuple(x.shape)}")
        self.state.check_batch(x.shape[0], self.name)
        mean, var = self.mean.merged(), self.var.merged()
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.merged()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.merged()
        # Constant statistics give [C]; varying ones [B, C]. Broadcast either over H, W.
        scale = scale.reshape(-1, x.shape[1], 1, 1).to(x.dtype)
        shift = shift.reshape(-1, x.shape[1], 1, 1).to(x.dtype)
        return torch.addcmul(shift, x, scale)


class SampleWiseEmbedding(nn.Module):
    """nn.Embedding with per-sample interpolated tables: one lookup in the stacked ``[V, G*D]`` table."""

    def __init__(
        self, emb: nn.Embedding, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState
    ) -> None:
        super().__init__()
        self.name = prefix.rstrip(".")
        if emb.max_norm is not None:
            raise ValueError(f"{self.name}: Embedding with max_norm renormalises its table in place; not supported")
        self.state = state
        tables = _per_source(sources, prefix + "weight")
        self.active = _active([(t,) for t in tables])
        t0 = tables[0].detach()
        self.dim = t0.shape[1]
        self.register_buffer("table", torch.cat([t0] + [tables[s].detach() - t0 for s in self.active], 1))

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() < 1:
            raise ValueError(f"{self.name}: expected batched indices [B, ...], got a scalar")
        self.state.check_batch(idx.shape[0], self.name)
        y = F.embedding(idx, self.table)
        if not self.active:
            return y
        g = 1 + len(self.active)
        out = combine(
            y.reshape(idx.shape[0], -1, g, self.dim), self.state.combine_weights(self.active), self.state.combine
        )
        return out.view(*idx.shape, self.dim)


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """torch MHA mask convention (bool True = masked out, float = added) -> additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class SampleWiseMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with per-sample interpolated projections.

    The stock module's fast path bypasses F.linear, so the projections are owned here and the attention core is
    ``F.scaled_dot_product_attention`` (or explicit softmax when ``need_weights=True``). Honours ``batch_first``,
    ``attn_mask`` (2-D or ``[B*heads, L, S]``, bool or additive), ``key_padding_mask`` and ``is_causal``.
    """

    def __init__(
        self, mha: nn.MultiheadAttention, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState
    ) -> None:
        super().__init__()
        self.name = prefix.rstrip(".")
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError(f"{self.name}: MultiheadAttention with bias_k/bias_v/add_zero_attn is not supported")
        self.state = state
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        e = self.embed_dim
        in_bias = _maybe(sources, prefix + "in_proj_bias")
        if mha._qkv_same_embed_dim:
            self.qkv = AffineStack(
                _per_source(sources, prefix + "in_proj_weight"), in_bias, state, self.name + ".in_proj"
            )
            self.q = self.k = self.v = None
        else:
            self.qkv = None
            names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            for i, (attr, key) in enumerate(zip(("q", "k", "v"), names, strict=True)):
                bias = [b[i * e : (i + 1) * e] for b in in_bias] if in_bias is not None else None
                setattr(self, attr, AffineStack(_per_source(sources, prefix + key), bias, state, f"{self.name}.{key}"))
        self.out_proj = AffineStack(
            _per_source(sources, prefix + "out_proj.weight"),
            _maybe(sources, prefix + "out_proj.bias"),
            state,
            self.name + ".out_proj",
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if query.dim() != 3:
            raise ValueError(f"{self.name}: expected batched 3-D inputs, got query of shape {tuple(query.shape)}")
        same = query is key and key is value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, lq, e = query.shape
        self.state.check_batch(b, self.name, dim=0 if self.batch_first else 1)
        h, hd = self.num_heads, self.head_dim
        if same and self.qkv is not None:
            q, k, v = self.qkv.linear(query).split(e, dim=-1)
        elif self.qkv is not None:
            q, k, v = (self.qkv.sliced(i * e, (i + 1) * e).linear(t) for i, t in enumerate((query, key, value)))
        else:
            q, k, v = self.q.linear(query), self.k.linear(key), self.v.linear(value)
        lk = k.shape[1]
        q = q.view(b, lq, h, hd).transpose(1, 2)
        k = k.view(b, lk, h, hd).transpose(1, 2)
        v = v.view(b, lk, h, hd).transpose(1, 2)

        mask = _additive_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(b, h, lq, lk)
        kpm = _additive_mask(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(b, 1, 1, lk)
            mask = kpm if mask is None else mask + kpm
        causal = is_causal and mask is None  # with a mask given, is_causal is only a hint that it is causal
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * hd**-0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            elif causal:
                scores = scores.masked_fill(
                    torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            weights = scores.softmax(-1)
            if dropout > 0:
                weights = F.dropout(weights, dropout)
            o = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        o = self.out_proj.linear(o.transpose(1, 2).reshape(b, lq, e))
        if not self.batch_first:
            o = o.transpose(0, 1)
        return o, weights


class SampleWiseLayerScale(nn.Module):
    """open_clip LayerScale (``x * gamma``) with a per-sample gamma."""

    def __init__(self, ls: nn.Module, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState):
        super().__init__()
        self.name = prefix.rstrip(".")
        self.state = state
        self.gamma = VectorStack(_per_source(sources, prefix + "gamma"), state)

    def forward(self, x: Tensor) -> Tensor:
        self.state.check_batch(x.shape[0], self.name)
        return x * _expand_to(self.gamma.merged(), x.dim(), 1).to(x.dtype)
