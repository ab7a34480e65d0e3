"""Running classifiers over data: batches, logits, routing and accuracy, shared by the methods.

* :func:`collect_logits` runs one or more models over a loader once, validating class counts and NaNs.
* :func:`route` sends each sample of a batch to its cluster's model and returns outputs in input order.
* :func:`predict_in_fit_order` replays a loader in the order ``fit`` saw it, with each batch's slice of the
  stored per-sample state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "PREDICTION_MODES",
    "check_mode",
    "collect_logits",
    "route",
    "predict_in_fit_order",
    "split_batch",
    "check_logits_finite",
    "evaluate_accuracy",
]


#: How a fitted DaWin answers: each sample through its cluster's blended model, or with its own weights.
PREDICTION_MODES = ("cluster", "exact")


def check_mode(mode: str, who: str) -> None:
    """Raises ValueError, prefixed ``who``, unless ``mode`` is one of :data:`PREDICTION_MODES`."""
    if mode not in PREDICTION_MODES:
        raise ValueError(f"{who}: mode must be 'cluster' or 'exact', got {mode!r}")


def split_batch(batch) -> tuple[Tensor, Tensor | None]:
    """A loader item is ``x``, ``(x, y)`` / ``[x, y, ...]`` or ``{"images": x, "labels": y}``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x = batch.get("images", batch.get("x"))
        if x is None:
            raise ValueError(f"loader yielded a dict without 'images' or 'x' (keys {sorted(batch)})")
        return x, batch.get("labels", batch.get("y"))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise TypeError(f"loader yielded a {type(batch).__name__}; expected x, (x, y) or a dict")


def check_logits_finite(logits: Tensor, what: str, offset: int = 0) -> None:
    """Raises ValueError naming the first sample (row, counted from ``offset``) with NaN/Inf logits."""
    bad = ~torch.isfinite(logits.reshape(logits.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what}: logits of sample {offset + i} are not finite ({logits[i].flatten()[:6].tolist()}...)"
        )


@torch.no_grad()
def collect_logits(
    models: Sequence[Callable[[Tensor], Tensor]],
    loader: Iterable,
    names: Sequence[str] | None = None,
    device: torch.device | None = None,
    progress: bool = False,
) -> tuple[list[Tensor], Tensor | None]:
    """Runs every model over ``loader`` once; returns ([N, C] logits per model, labels or None).

    Raises when the loader is empty, when two models or two batches disagree on the number of classes
    (naming the batch), or when a model gives NaN/Inf logits (naming the first offending sample).
    """
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    outs: list[list[Tensor]] = [[] for _ in models]
    labels: list[Tensor] = []
    n_classes = None
    seen = 0
    has_labels = None
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="logits", leave=False)
    for b, batch in enumerate(iterator):
        x, y = split_batch(batch)
        if device is not None:
            x = x.to(device)
        if has_labels is None:
            has_labels = y is not None
        elif has_labels != (y is not None):
            raise ValueError(f"loader batch {b}: some batches carry labels and others do not")
        for i, model in enumerate(models):
            z = model(x)
            if z.dim() != 2 or z.shape[0] != x.shape[0]:
                raise ValueError(f"{names[i]}: expected logits [B, C] for batch {b}, got {tuple(z.shape)}")
            if n_classes is None:
                n_classes = z.shape[1]
            elif z.shape[1] != n_classes:
                raise ValueError(f"{names[i]}: batch {b} has {z.shape[1]} classes but earlier logits had {n_classes}")
            check_logits_finite(z, names[i], offset=seen)
            outs[i].append(z.detach().float().cpu())
        if y is not None:
            labels.append(y.detach().cpu())
        seen += x.shape[0]
    if seen == 0:
        raise ValueError("collect_logits: the loader yielded no samples")
    return [torch.cat(o) for o in outs], (torch.cat(labels) if labels else None)


@torch.no_grad()
def route(models: Sequence[Callable[[Tensor], Tensor]], x: Tensor, assignment: Tensor) -> Tensor:
    """Runs sample i through ``models[assignment[i]]``; returns outputs in the order of ``x``.

    Each model present in ``assignment`` runs once, on its sub-batch.
    """
    assignment = torch.as_tensor(assignment, dtype=torch.long).cpu()
    if assignment.shape != (x.shape[0],):
        raise ValueError(f"route: assignment must be [{x.shape[0]}], got {tuple(assignment.shape)}")
    out = None
    for k in torch.unique(assignment).tolist():
        if not 0 <= k < len(models):
            raise ValueError(f"route: cluster {k} does not exist (have {len(models)} models)")
        idx = (assignment == k).nonzero().squeeze(1)
        z = models[k](x[idx.to(x.device)])
        if out is None:
            out = z.new_empty((x.shape[0], *z.shape[1:]))
        out[idx.to(z.device)] = z
    assert out is not None
    return out


def predict_in_fit_order(
    loader: Iterable,
    n_samples: int,
    device: torch.device | str,
    what: str,
    forward: Callable[[Tensor, int, int], Tensor],
) -> Tensor:
    """Runs ``forward(x, start, stop)`` on every batch of ``loader``, where ``[start, stop)`` are the batch's
    sample indices in ``fit`` order, and concatenates the outputs. Raises ``ValueError`` (prefixed ``what``)
    unless the loader yields exactly ``n_samples`` samples."""
    outs, start = [], 0
    for batch in loader:
        x, _ = split_batch(batch)
        stop = start + x.shape[0]
        if stop > n_samples:
            raise ValueError(f"{what}: the loader has more than the {n_samples} fit samples")
        outs.append(forward(x.to(device), start, stop))
        start = stop
    if start != n_samples:
        raise ValueError(f"{what}: the loader has {start} samples but fit saw {n_samples}")
    return torch.cat(outs)


@torch.no_grad()
def evaluate_accuracy(model: Callable[[Tensor], Tensor], loader: Iterable, device=None) -> float:
    """Top-1 accuracy of ``model`` over a loader of ``(x, y)``."""
    correct = total = 0
    for b, batch in enumerate(loader):
        x, y = split_batch(batch)
        if y is None:
            raise ValueError(f"evaluate_accuracy: batch {b} has no labels")
        if device is not None:
            x = x.to(device)
        pred = model(x).argmax(dim=-1).cpu()
        correct += int((pred == y.cpu()).sum())
        total += y.shape[0]
    if total == 0:
        raise ValueError("evaluate_accuracy: the loader yielded no samples")
    return correct / total
