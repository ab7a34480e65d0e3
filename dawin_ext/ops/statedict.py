"""State-dict helpers: normalizing inputs and checking compatibility before any work is done."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]

__all__ = [
    "StateDict",
    "as_state_dict",
    "check_compatible",
    "check_finite_matrix",
    "check_finite_state_dict",
    "check_keys_and_shapes",
    "IncompatibleStateDictsError",
]


class IncompatibleStateDictsError(ValueError):
    """Two parameter sets that should line up do not: a key, shape, dtype or device differs."""


def as_state_dict(obj: nn.Module | Mapping[str, Tensor], name: str = "argument") -> StateDict:
    """Returns a plain ``{key: tensor}`` view of a module or mapping (no copies)."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict(keep_vars=False))
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor")
        return dict(obj)
    raise TypeError(
        f"{name}: expected an nn.Module or a state dict (mapping of str to Tensor), got {type(obj).__name__}"
    )


def check_compatible(
    state_dicts: Sequence[Mapping[str, Tensor]],
    names: Sequence[str] | None = None,
    subset_ok: bool = False,
) -> list[str]:
    """Checks that every state dict has the keys, shapes, dtypes and devices of the first one.

    Returns the first state dict's keys in order. Raises :class:`IncompatibleStateDictsError` naming
    the first offending key and both values. With ``subset_ok`` the others may hold extra keys.
    Also refuses tensors on more than one device.
    """
    if names is None:
        names = [f"state dict {i}" for i in range(len(state_dicts))]
    ref = state_dicts[0]
    ref_name = names[0]
    keys = list(ref.keys())
    ref_keys = set(keys)
    devices = {t.device for t in ref.values()}
    if len(devices) > 1:
        raise IncompatibleStateDictsError(f"{ref_name} has tensors on several devices: {sorted(map(str, devices))}")
    for sd, name in zip(state_dicts[1:], names[1:], strict=True):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise IncompatibleStateDictsError(f"{name} is missing key {missing[0]!r} that {ref_name} has")
        if not subset_ok:
            extra = [k for k in sd if k not in ref_keys]
            if extra:
                raise IncompatibleStateDictsError(f"{name} has extra key {extra[0]!r} that {ref_name} lacks")
        for k in keys:
            a, b = ref[k], sd[k]
            if not isinstance(b, Tensor):
                raise IncompatibleStateDictsError(f"{name}[{k!r}] is a {type(b).__name__}, not a tensor")
            if a.shape != b.shape:
                raise IncompatibleStateDictsError(
                    f"key {k!r}: {ref_name} has shape {tuple(a.shape)} but {name} has {tuple(b.shape)}"
                )
            if a.dtype != b.dtype:
                raise IncompatibleStateDictsError(f"key {k!r}: {ref_name} has dtype {a.dtype} but {name} has {b.dtype}")
            if a.device != b.device:
                raise IncompatibleStateDictsError(f"key {k!r}: {ref_name} is on {a.device} but {name} is on {b.device}")
    return keys


def check_keys_and_shapes(
    got: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    name: str,
    expected_name: str = "this architecture",
    prefix: str = "",
) -> None:
    """Raises ValueError naming ``name`` and the first key that ``got`` lacks, holds in excess, or holds in another
    shape than ``expected`` (whose keys are read with ``prefix`` in front).

    The check of a checkpoint against the architecture it is loaded into, where dtypes and devices may still differ
    (loading converts them); :func:`check_compatible` is the stricter check between the state dicts to interpolate.
    """
    want = {prefix + k: v for k, v in expected.items()}
    missing = [k for k in want if k not in got]
    if missing:
        raise ValueError(f"{name} is missing key {missing[0]!r} that {expected_name} has")
    extra = [k for k in got if k not in want]
    if extra:
        raise ValueError(f"{name} has unexpected key {extra[0]!r} that {expected_name} lacks")
    for k, ref in want.items():
        if got[k].shape != ref.shape:
            raise ValueError(
                f"{name} key {k!r} has shape {tuple(got[k].shape)} but {expected_name} has {tuple(ref.shape)}"
            )


def check_finite_matrix(matrix: Tensor, what: str) -> None:
    """Raises ValueError naming the first row/column holding NaN or Inf."""
    bad = ~torch.isfinite(matrix)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{what} must be finite; entry {tuple(idx)} is {matrix[tuple(idx)].item()}")


@torch.no_grad()
def check_finite_state_dict(sd: Mapping[str, Tensor], name: str) -> None:
    """Raises ValueError naming ``name``, the first key and the element that hold NaN or Inf.

    Run once when a method receives its weights: a NaN weight would otherwise turn every merged model's
    outputs into NaN far from the cause.
    """
    for key, t in sd.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            idx = tuple((~finite).nonzero()[0].tolist())
            raise ValueError(f"{name}[{key!r}] holds a non-finite value ({t[idx].item()} at index {idx})")
