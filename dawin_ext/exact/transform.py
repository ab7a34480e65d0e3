"""SampleWiseInterpolator: exact per-sample weight interpolation for a whole batch in one forward pass."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..ops.statedict import (
    as_state_dict,
    check_compatible,
    check_finite_matrix,
    check_finite_state_dict,
    check_keys_and_shapes,
)
from .engine import DEFAULT_MATERIALIZE_BUDGET_BYTES, Engine, UnsupportedParameterError, make_stack

__all__ = ["SampleWiseInterpolator", "UnsupportedParameterError", "task_vector_coefficients"]


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        if not t.is_meta:
            return t.device
    for t in module.buffers():
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


_COMBINE_STRATEGIES = ("kernel", "torch")


def task_vector_coefficients(scales: Tensor) -> Tensor:
    """Rows for task arithmetic: ``[B, T]`` task-vector scales -> ``[B, T + 1]`` = ``[1 - sum, scales...]``.

    With sources ``[theta_0, theta_1, ..., theta_T]`` this gives ``theta_0 + sum_t scales_t (theta_t - theta_0)``.
    """
    if scales.dim() != 2:
        raise ValueError(f"scales must be [B, T], got shape {tuple(scales.shape)}")
    return torch.cat([1 - scales.sum(1, keepdim=True), scales], 1)


class _ModuleProxy:
    """``SampleWiseInterpolator.module``: the module's attributes, with every method and submodule call run
    through the exact engine under the active coefficients (``with swi.coefficients(c): swi.module.m(...)``)."""

    __slots__ = ("_swi", "_target")

    def __init__(self, swi: SampleWiseInterpolator, target: nn.Module) -> None:
        object.__setattr__(self, "_swi", swi)
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str):
        target = self._target
        attr = getattr(target, name)
        if isinstance(attr, nn.Module):
            return _ModuleProxy(self._swi, attr)
        if callable(attr) and getattr(attr, "__self__", None) is target:
            return self._swi._bound(attr, name)
        return attr

    def __getitem__(self, key):
        item = self._target[key]
        return _ModuleProxy(self._swi, item) if isinstance(item, nn.Module) else item

    def __call__(self, *args, **kwargs):
        return self._swi._bound(self._target, "forward")(*args, **kwargs)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError("SampleWiseInterpolator.module is read-only")

    def __repr__(self) -> str:
        return f"SampleWiseInterpolator.module({self._target!r})"

    @property
    def wrapped(self) -> nn.Module:
        """The engine's copy of the module (varying parameters are meta placeholders: do not call it directly)."""
        return self._target


class SampleWiseInterpolator(nn.Module):
    """Runs ``module`` so that sample ``b`` uses the parameters ``sum_s coefficients[b, s] * sources[s]``.

    Exact, for any module: sample ``b`` runs the module's own code (any method) with the merged parameters. The
    batch runs as one ``torch.vmap`` pass; every parameter that differs between sources is a placeholder whose
    uses are routed per sample: linear maps, convolutions and embeddings through the sample-wise kernels (no
    per-sample weight copies), anything else on the merged value built per sample. See
    :mod:`dawin_ext.exact.engine` for the mechanism and README "Exact per-sample mode" for what is refused.

    Each sample runs as a batch of one: inputs whose dim 0 has the batch size are split per sample (declare other
    layouts with ``coefficients(c, in_dims=...)``); other inputs (masks ``[L, L]``, position ids ``[1, L]``) are
    shared. Outputs come back with the batch at dim 0 (``out_dims`` to choose another dim); outputs that do not
    depend on the sample are returned once.

    Coefficient rows must sum to 1 (within ``atol``); source 0's coefficient is then taken as
    ``1 - sum_{s>0} c_s``. For task arithmetic build the rows with :func:`task_vector_coefficients`. Inference
    only: the module runs in eval mode under ``torch.no_grad()``.

    Args:
        module: the network (not modified: a deep copy is used).
        sources: S state dicts with exactly ``module.state_dict()``'s keys and shapes.
        atol: tolerance on ``|sum(row) - 1|``.
        combine: kept for compatibility (``"torch"`` or ``"kernel"``); the engine picks its kernels itself.
        materialize_budget_bytes: most bytes that per-sample copies of varying parameters (``[B, ...]``) may take
            in one call; matrices above 1M entries are never copied per sample regardless.
        strict: raise :class:`~dawin_ext.exact.engine.NoBatchingRuleError` instead of warning when an op has
            no batching rule and would run as a per-sample loop.
    """

    def __init__(
        self,
        module: nn.Module,
        sources: Sequence[Mapping[str, Tensor] | nn.Module],
        *,
        atol: float = 1e-5,
        combine: str = "torch",
        materialize_budget_bytes: int = DEFAULT_MATERIALIZE_BUDGET_BYTES,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if combine not in _COMBINE_STRATEGIES:
            raise ValueError(f"combine must be one of {_COMBINE_STRATEGIES}, got {combine!r}")
        if isinstance(sources, Mapping) or not isinstance(sources, Sequence):
            raise TypeError("sources must be a sequence of state dicts")
        sds = [as_state_dict(s, name=f"source {i}") for i, s in enumerate(sources)]
        if not sds:
            raise ValueError("sources: need at least one state dict")
        ref = module.state_dict()
        for i, sd in enumerate(sds):
            check_keys_and_shapes(sd, ref, f"source {i}", "the module's state dict")
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
        device = _module_device(module)
        with torch.no_grad():
            work = copy.deepcopy(module)
            work.load_state_dict(sds[0])
            work = work.to(device).eval()
            stacks = self._install_placeholders(work, sds, varying, device)
        self.net = work
        self._device = device  # every parameter may be a placeholder (meta), so remember where the module lives
        self._engine = Engine(work, stacks, materialize_budget_bytes, strict)
        self.varying_keys = sorted(varying)
        self._rows: Tensor | None = None
        self._in_dims = None
        self._out_dims = 0

    @staticmethod
    def _install_placeholders(work: nn.Module, sds, varying: set[str], device: torch.device) -> dict:
        """Replaces every varying tensor of ``work`` by a meta placeholder; returns {name: Stack}."""
        groups: dict[int, list[str]] = {}
        tensors: dict[int, Tensor] = {}
        for n, t in [*work.named_parameters(remove_duplicate=False), *work.named_buffers(remove_duplicate=False)]:
            if t is not None:
                groups.setdefault(id(t), []).append(n)
                tensors[id(t)] = t
        named = {n for names in groups.values() for n in names}
        unknown = sorted(varying - named)
        if unknown:
            raise UnsupportedParameterError(
                f"state-dict entry {unknown[0]!r} differs between sources but is not a parameter or buffer of the "
                "module (a custom state_dict hook?), so it cannot be interpolated per sample"
            )
        stacks = {}
        for key, names in groups.items():
            hit = [n for n in names if n in varying]
            if not hit:
                continue
            name = hit[0]
            is_param = isinstance(tensors[key], nn.Parameter)
            ph = torch.empty(tensors[key].shape, dtype=tensors[key].dtype, device="meta")
            if is_param:
                ph = nn.Parameter(ph, requires_grad=False)
            st = make_stack(name, [sd[name].to(device) for sd in sds], ph)
            for n in names:
                owner = work.get_submodule(n.rsplit(".", 1)[0]) if "." in n else work
                leaf = n.rsplit(".", 1)[-1]
                if is_param:
                    owner._parameters[leaf] = ph
                else:
                    owner._buffers[leaf] = ph
                if hasattr(owner, "_flat_weights_names") and leaf in owner._flat_weights_names:
                    owner._init_flat_weights()  # nn.RNN keeps its own list of the weight tensors
                stacks[n] = st
        return stacks

    @property
    def module(self) -> _ModuleProxy:
        """The module, whose methods run per sample inside :meth:`coefficients` (``swi.module.encode_image(x)``)."""
        return _ModuleProxy(self, self.net)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def last_materialized(self) -> list[tuple[str, tuple[int, ...]]]:
        """(parameter, per-sample shape) of every per-sample copy the last call made (for audits and tests)."""
        return list(self._engine.last_materialized)

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
    def coefficients(self, coefficients: Tensor, *, in_dims: dict | None = None, out_dims: int = 0) -> Iterator[Tensor]:
        """Context in which ``self.module`` (and any of its methods) runs with these per-sample rows.

        ``in_dims`` declares the batch dim of inputs whose layout cannot be inferred: ``{positional index or
        keyword name: dim or None (shared by all samples)}``; ``out_dims`` is the dim where outputs hold the batch.
        """
        rows = self.validate(coefficients)
        previous = (self._rows, self._in_dims, self._out_dims)
        self._rows, self._in_dims, self._out_dims = rows, in_dims, int(out_dims)
        try:
            yield rows
        finally:
            self._rows, self._in_dims, self._out_dims = previous

    def _bound(self, method, name: str):
        def run(*args, **kwargs):
            if self._rows is None:
                raise RuntimeError(
                    f"{name}() called without coefficients: call it through SampleWiseInterpolator.forward / "
                    "call(), or inside `with swi.coefficients(rows):`"
                )
            return self._engine.run(method, self._rows, args, kwargs, self._in_dims, self._out_dims)

        return run

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
