"""Reusable interpolated models: :class:`BlendedModels` owns K copies of a module and re-blends their parameters in
place with ``blend(out=...)``, so building interpolated models allocates nothing after construction."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..ops import blend
from ..ops.statedict import StateDict, as_state_dict, check_compatible

__all__ = ["BlendedModels"]


def _contiguous_(module: nn.Module) -> None:
    """Makes every parameter and buffer contiguous in place (blend writes contiguous outputs)."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        for name, b in list(module.named_buffers()):
            if b is not None and not b.is_contiguous():
                owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
                setattr(owner, name.rpartition(".")[2], b.contiguous())


class BlendedModels:
    """K copies of ``module`` whose weights are blends of S source state dicts.

    ``blend(coefficients)`` writes ``sum_s coefficients[k, s] * sources[s]`` into copy k's own parameter
    tensors (through ``dawin_ext.blend(..., out=...)``), so re-blending costs one pass over the weights and
    no allocation. The copies are put in eval mode and never require gradients. ``module`` itself is not
    modified.

    Args:
        module: architecture (its weights are only used as buffers to be overwritten).
        sources: S state dicts or modules; they must have exactly the keys, shapes, dtypes and device of
            ``module.state_dict()`` (checked; the error names the first offending key).
        n_models: K, the number of reusable copies.
    """

    def __init__(self, module: nn.Module, sources: Sequence[Mapping[str, Tensor] | nn.Module], n_models: int) -> None:
        if int(n_models) < 1:
            raise ValueError(f"BlendedModels: n_models must be >= 1, got {n_models}")
        if len(sources) < 1:
            raise ValueError("BlendedModels: need at least one source")
        self.sources: list[StateDict] = [as_state_dict(s, f"source {i}") for i, s in enumerate(sources)]
        template = as_state_dict(module, "module")
        check_compatible(
            [template, *self.sources], names=["module", *[f"source {i}" for i in range(len(self.sources))]]
        )
        self.models: list[nn.Module] = []
        for _ in range(int(n_models)):
            m = copy.deepcopy(module)
            m.eval()
            m.requires_grad_(False)
            _contiguous_(m)
            self.models.append(m)
        # state_dict() of a module returns its live tensors: blending into them updates the module.
        self.buffers: list[StateDict] = [dict(m.state_dict()) for m in self.models]
        self.coefficients: Tensor | None = None

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, k: int) -> nn.Module:
        return self.models[k]

    def blend(self, coefficients, rows: Sequence[int] | None = None) -> None:
        """Re-blends the copies listed in ``rows`` (default all) with ``coefficients`` [len(rows), S]."""
        coef = torch.as_tensor(coefficients, dtype=torch.float64)
        if coef.dim() == 1:
            coef = coef.unsqueeze(0)
        rows = list(range(len(self.models))) if rows is None else [int(r) for r in rows]
        if coef.shape[0] != len(rows):
            raise ValueError(f"BlendedModels.blend: {coef.shape[0]} coefficient rows for {len(rows)} models")
        blend(self.sources, coef, out=[self.buffers[r] for r in rows])
        if self.coefficients is None:
            self.coefficients = torch.full((len(self.models), len(self.sources)), float("nan"), dtype=torch.float64)
        self.coefficients[rows] = coef
