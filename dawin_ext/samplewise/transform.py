"""SampleWiseInterpolator: exact per-sample weight interpolation for a whole batch in one forward pass."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import check_finite_state_dict
from ..statedict import as_state_dict, check_compatible, check_finite_matrix
from . import layers as L
from . import openclip as oc

__all__ = ["SampleWiseInterpolator", "UnsupportedParameterError", "task_vector_coefficients"]


class UnsupportedParameterError(ValueError):
    """A parameter differs between sources but enters the network in a way that cannot be computed per sample
    exactly (not through an affine op this module knows, e.g. ``logit_scale`` through exp())."""


@dataclass(frozen=True)
class _Handler:
    match: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, list, str, L.CoefficientState], nn.Module]
    # Raw parameter names the handler takes over; None = every state-dict entry of the module (a leaf layer).
    raw: tuple[str, ...] | None = None


def _exact(*types: type) -> Callable[[nn.Module], bool]:
    # Exact types only: a subclass may override forward, and replacing it would silently change the network.
    return lambda m: type(m) in types


def _oc(name: str) -> Callable[[nn.Module], bool]:
    return lambda m: oc.is_open_clip(m, name)


def _linear_types() -> tuple[type, ...]:
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    return (nn.Linear, NonDynamicallyQuantizableLinear)


_HANDLERS: tuple[_Handler, ...] = (
    _Handler(_exact(*_linear_types()), lambda m, sds, p, st: L.SampleWiseLinear(sds, p, st)),
    _Handler(_exact(nn.Conv2d), lambda m, sds, p, st: L.SampleWiseConv2d(m, sds, p, st)),
    _Handler(
        lambda m: type(m) is nn.LayerNorm or oc.is_open_clip(m, "LayerNorm") or oc.is_open_clip(m, "LayerNormFp32"),
        lambda m, sds, p, st: L.SampleWiseLayerNorm(m, sds, p, st),
    ),
    _Handler(_exact(nn.BatchNorm2d), lambda m, sds, p, st: L.SampleWiseBatchNorm2d(m, sds, p, st)),
    _Handler(_exact(nn.Embedding), lambda m, sds, p, st: L.SampleWiseEmbedding(m, sds, p, st)),
    _Handler(_exact(nn.MultiheadAttention), lambda m, sds, p, st: L.SampleWiseMultiheadAttention(m, sds, p, st)),
    _Handler(_oc("LayerScale"), lambda m, sds, p, st: L.SampleWiseLayerScale(m, sds, p, st)),
    _Handler(_oc("AttentionPool2d"), lambda m, sds, p, st: oc.SampleWiseAttentionPool2d(m, sds, p, st)),
    _Handler(
        _oc("VisionTransformer"),
        lambda m, sds, p, st: oc.SampleWiseVisionTransformer(m, sds, p, st),
        oc.OPEN_CLIP_RAW_PARAMS["VisionTransformer"],
    ),
    _Handler(
        _oc("TextTransformer"),
        lambda m, sds, p, st: oc.SampleWiseTextTransformer(m, sds, p, st),
        oc.OPEN_CLIP_RAW_PARAMS["TextTransformer"],
    ),
    _Handler(_oc("CLIP"), lambda m, sds, p, st: oc.SampleWiseCLIP(m, sds, p, st), oc.OPEN_CLIP_RAW_PARAMS["CLIP"]),
)


class _Builder:
    def __init__(self, sources: list[dict[str, Tensor]], varying: set[str], state: L.CoefficientState) -> None:
        self.sources = sources
        self.varying = varying
        self.state = state
        self.claimed: set[str] = set()

    def transform(self, module: nn.Module, prefix: str) -> nn.Module:
        handler = next((h for h in _HANDLERS if h.match(module)), None)
        if handler is not None and handler.raw is None:
            keys = {prefix + k for k in module.state_dict()}
            if not keys & self.varying:
                return module  # identical in every source: the stock layer is exact and fastest
            self.claimed |= keys
            return handler.build(module, self.sources, prefix, self.state)
        for name, child in list(module.named_children()):
            new = self.transform(child, f"{prefix}{name}.")
            if new is not child:
                module._modules[name] = new
        if handler is not None:
            keys = {prefix + k for k in handler.raw if prefix + k in self.sources[0]}
            if keys & self.varying:
                self.claimed |= keys
                return handler.build(module, self.sources, prefix, self.state)
        return module


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def task_vector_coefficients(scales: Tensor) -> Tensor:
    """Rows for task arithmetic: ``[B, T]`` task-vector scales -> ``[B, T + 1]`` = ``[1 - sum, scales...]``.

    With sources ``[theta_0, theta_1, ..., theta_T]`` this gives ``theta_0 + sum_t scales_t (theta_t - theta_0)``.
    """
    if scales.dim() != 2:
        raise ValueError(f"scales must be [B, T], got shape {tuple(scales.shape)}")
    return torch.cat([1 - scales.sum(1, keepdim=True), scales], 1)


class SampleWiseInterpolator(nn.Module):
    """Runs ``module`` so that sample ``b`` uses the parameters ``sum_s coefficients[b, s] * sources[s]``.

    Exact (not an approximation): every parameter that differs between sources enters the network through an
    op that is linear in (weight, bias) jointly (linear, conv, attention projections, embeddings) or is a small
    vector merged per sample directly (norm affine and statistics, class token, positional embedding). Such ops
    run once on ``[W0; W_1 - W0; ...]`` and are blended per sample with ``[1, c_1, ...]``. A parameter that
    differs and is used any other way raises :class:`UnsupportedParameterError` naming it.

    Coefficient rows must sum to 1 (within ``atol``); source 0's coefficient is then taken as
    ``1 - sum_{s>0} c_s``. Rows that do not sum to 1 are refused: for task arithmetic build the rows with
    :func:`task_vector_coefficients`. Inference only: the copy is put in eval mode, and the coefficients are
    treated as constants (detached; no gradient flows to them).

    Args:
        module: the network (not modified: a deep copy is transformed).
        sources: S state dicts with exactly ``module.state_dict()``'s keys and shapes.
        atol: tolerance on ``|sum(row) - 1|``.
        combine: how output-stacked layers blend their partial outputs: ``"torch"`` (addcmul chain, the default: it
            measured at least as fast as the scalar CPU kernel, see benchmarks/test_bench_samplewise.py) or
            ``"kernel"`` (``dawin_ext.sample_combine``).
    """

    def __init__(
        self,
        module: nn.Module,
        sources: Sequence[Mapping[str, Tensor] | nn.Module],
        *,
        atol: float = 1e-5,
        combine: str = "torch",
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(sources, Mapping) or not isinstance(sources, Sequence):
            raise TypeError("sources must be a sequence of state dicts")
        sds = [as_state_dict(s, name=f"source {i}") for i, s in enumerate(sources)]
        if not sds:
            raise ValueError("sources: need at least one state dict")
        ref = module.state_dict()
        for i, sd in enumerate(sds):
            missing = [k for k in ref if k not in sd]
            if missing:
                raise ValueError(f"source {i} is missing key {missing[0]!r} of the module's state dict")
            extra = [k for k in sd if k not in ref]
            if extra:
                raise ValueError(f"source {i} has key {extra[0]!r} that the module's state dict lacks")
            for k, t in sd.items():
                if t.shape != ref[k].shape:
                    raise ValueError(
                        f"source {i} key {k!r} has shape {tuple(t.shape)}, the module has {tuple(ref[k].shape)}"
                    )
        check_compatible(sds, names=[f"source {i}" for i in range(len(sds))])
        for i, sd in enumerate(sds):  # a NaN weight would otherwise surface as NaN outputs far from the cause
            check_finite_state_dict(sd, f"SampleWiseInterpolator: source {i}")
        self.num_sources = len(sds)
        self.atol = float(atol)

        varying = {k for k in sds[0] if any(not torch.equal(sd[k], sds[0][k]) for sd in sds[1:])}
        for k in sorted(varying):
            if not sds[0][k].is_floating_point():
                if k.endswith("num_batches_tracked"):
                    varying.discard(k)  # only read by BatchNorm in training mode, which is refused
                else:
                    raise UnsupportedParameterError(f"non-floating-point entry {k!r} differs between sources")
        self._state = L.CoefficientState(self.num_sources, combine)
        with torch.no_grad():
            work = copy.deepcopy(module)
            work.load_state_dict(sds[0])
            builder = _Builder(sds, varying, self._state)
            work = builder.transform(work, "")
        unclaimed = sorted(varying - builder.claimed)
        if unclaimed:
            k = unclaimed[0]
            owner = module.get_submodule(k.rsplit(".", 1)[0]) if "." in k else module
            raise UnsupportedParameterError(
                f"parameter {k!r} (in {type(owner).__name__}) differs between sources but is not used through an "
                f"op that the sample-wise interpolator can show is affine in it, so it cannot be interpolated per "
                f"sample exactly ({len(unclaimed)} such entries: {unclaimed[:5]}). Make it identical in all sources "
                "or pass a submodule that does not use it (e.g. model.visual instead of the whole CLIP)."
            )
        self.module = work.to(_module_device(module)).eval()
        self.varying_keys = sorted(varying)

    @property
    def device(self) -> torch.device:
        return _module_device(self.module)

    def validate(self, coefficients: Tensor) -> Tensor:
        """Checks ``[B, S]`` rows (type, shape, dtype, device, finiteness, sum to 1); returns them as float32."""
        if not isinstance(coefficients, Tensor):
            raise TypeError(f"coefficients must be a torch.Tensor [B, S], got {type(coefficients).__name__}")
        s = self.num_sources
        if coefficients.dim() != 2 or coefficients.shape[1] != s or coefficients.shape[0] < 1:
            raise ValueError(f"coefficients must have shape [B, {s}] (B >= 1), got {tuple(coefficients.shape)}")
        if not coefficients.is_floating_point():
            raise TypeError(f"coefficients must be floating point, got {coefficients.dtype}")
        if coefficients.device != self.device:
            raise ValueError(f"coefficients are on {coefficients.device} but the interpolator is on {self.device}")
        c = coefficients.detach()
        check_finite_matrix(c, "coefficients")
        err = (c.double().sum(1) - 1).abs()
        bad = int(err.argmax())
        if float(err[bad]) > self.atol:
            raise ValueError(
                f"coefficient rows must sum to 1 (atol {self.atol}); row {bad} sums to {float(c[bad].double().sum())}. "
                "For task-arithmetic scales use task_vector_coefficients()"
            )
        return c.to(torch.float32).contiguous()

    @contextlib.contextmanager
    def coefficients(self, coefficients: Tensor) -> Iterator[Tensor]:
        """Context in which ``self.module`` (and any of its methods) runs with these per-sample rows."""
        rows = self.validate(coefficients)
        self._state.set(rows)
        try:
            yield rows
        finally:
            self._state.set(None)

    def forward(self, x, coefficients: Tensor, *args, **kwargs):
        """``module(x, *args, **kwargs)`` where sample ``b`` uses ``sum_s coefficients[b, s] * sources[s]``."""
        with self.coefficients(coefficients) as rows:
            if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] != rows.shape[0]):
                raise ValueError(
                    f"x has batch size {x.shape[0] if x.dim() else 'none'} but coefficients have {rows.shape[0]} rows"
                )
            return self.module(x, *args, **kwargs)

    def call(self, method: str, coefficients: Tensor, *args, **kwargs):
        """Calls ``module.<method>(*args, **kwargs)`` with these rows, e.g. ``call("encode_text", c, tokens)``."""
        with self.coefficients(coefficients):
            return getattr(self.module, method)(*args, **kwargs)

    def forward_candidates(self, x: Tensor, candidates: Tensor) -> Tensor:
        """Evaluates K coefficient rows on the whole batch in one pass: returns ``[K, B, ...]``.

        Sample ``b`` under candidate ``k`` is ``out[k, b]`` (e.g. AdaWiSE scoring several alpha values at once).
        """
        if candidates.dim() != 2:
            raise ValueError(f"candidates must be [K, S], got shape {tuple(candidates.shape)}")
        k, b = candidates.shape[0], x.shape[0]
        xr = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        out = self(xr, candidates.repeat_interleave(b, dim=0))
        return out.view(k, b, *out.shape[1:])
