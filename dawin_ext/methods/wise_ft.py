"""WiSE-FT: weight-space ensembles of a zero-shot and a fine-tuned model (mlfoundations/wise-ft).

* :func:`wise_ft` merges two state dicts, plainly ``(1 - a) * theta_0 + a * theta_1`` (through the fused
  ``blend`` kernel) or Fisher-weighted.
* :func:`wise_ft_sweep` evaluates a list of alphas, re-blending one reusable model copy per alpha.
* :func:`output_ensemble` is the output-space baseline: a mixture of the two models' probabilities.
* :func:`diagonal_fisher` estimates the diagonal empirical Fisher used by the Fisher-weighted merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import blend
from ..ops.statedict import StateDict, as_state_dict, check_compatible, check_finite_state_dict
from .blended import BlendedModels
from .inference import check_logits_finite, split_batch

__all__ = ["wise_ft", "wise_ft_sweep", "output_ensemble", "diagonal_fisher"]

T = TypeVar("T")


def _check_alpha(alpha: float, fisher: bool) -> float:
    a = float(alpha.item() if isinstance(alpha, Tensor) else alpha)
    if not math.isfinite(a):
        raise ValueError(f"wise_ft: alpha must be finite, got {a}")
    if fisher and not 0.0 <= a <= 1.0:
        raise ValueError(f"wise_ft: the Fisher-weighted merge needs alpha in [0, 1], got {a}")
    return a


def wise_ft(
    theta_0: Mapping[str, Tensor] | nn.Module,
    theta_1: Mapping[str, Tensor] | nn.Module,
    alpha: float,
    fishers: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    fisher_floor: float = 1e-8,
) -> StateDict:
    """Returns the WiSE-FT merge of ``theta_0`` (zero-shot) and ``theta_1`` (fine-tuned) at ``alpha``.

    Without ``fishers``: ``(1 - alpha) * theta_0 + alpha * theta_1`` for every floating key (one fused
    ``blend`` pass); other keys (integer buffers) are copied from ``theta_0``.

    With ``fishers = (F0, F1)`` (diagonal Fisher state dicts), per key and element, as in wise-ft:
    ``c0 = (1 - alpha) * max(F0, floor)``, ``c1 = alpha * max(F1, floor)`` and
    ``theta = (c0 * theta_0 + c1 * theta_1) / (c0 + c1)``. A key absent from both Fishers gets weight 1
    (plain interpolation); a key present in only one of them is an error, as in wise-ft.

    Args:
        theta_0, theta_1: state dicts or modules with identical keys, shapes, dtypes and device (checked
            first; the error names the first offending key).
        alpha: weight on ``theta_1``; must be in [0, 1] for the Fisher merge.
        fishers: optional pair of Fisher state dicts (subsets of the keys, same shapes).
        fisher_floor: lower bound applied to every Fisher entry.

    Returns:
        A new state dict; the inputs are not modified.
    """
    sd0 = as_state_dict(theta_0, "theta_0")
    sd1 = as_state_dict(theta_1, "theta_1")
    keys = check_compatible([sd0, sd1], names=["theta_0", "theta_1"])
    a = _check_alpha(alpha, fishers is not None)
    check_finite_state_dict(sd0, "wise_ft: theta_0")
    check_finite_state_dict(sd1, "wise_ft: theta_1")
    if fishers is None:
        return blend([sd0, sd1], [[1.0 - a, a]])[0]
    if len(fishers) != 2:
        raise ValueError(f"wise_ft: fishers must be a pair (F0, F1), got {len(fishers)} entries")
    if not fisher_floor > 0:
        raise ValueError(f"wise_ft: fisher_floor must be > 0 (it keeps c0 + c1 positive), got {fisher_floor}")
    f0, f1 = (as_state_dict(f, f"fishers[{i}]") for i, f in enumerate(fishers))
    for name, f in (("fishers[0]", f0), ("fishers[1]", f1)):
        extra = [k for k in f if k not in sd0]
        if extra:
            raise ValueError(f"wise_ft: {name} has key {extra[0]!r} that theta_0 lacks")
    merged: StateDict = {}
    with torch.no_grad():
        for key in keys:
            p0, p1 = sd0[key], sd1[key]
            if (key in f0) != (key in f1):
                have = "fishers[0]" if key in f0 else "fishers[1]"
                raise ValueError(f"wise_ft: key {key!r} has a Fisher only in {have}; give both or neither")
            if p0.is_complex():
                raise TypeError(f"wise_ft: key {key!r} is complex ({p0.dtype}); only real weights can be merged")
            if not p0.is_floating_point():
                merged[key] = p0.clone()  # integer buffers are copied from theta_0, as blend does
                continue
            acc = torch.float64 if p0.dtype == torch.float64 else torch.float32
            if key not in f0:
                merged[key] = ((1.0 - a) * p0.to(acc) + a * p1.to(acc)).to(p0.dtype)
                continue
            fs = []
            for name, f in (("fishers[0]", f0), ("fishers[1]", f1)):
                if f[key].shape != p0.shape:
                    raise ValueError(
                        f"wise_ft: {name}[{key!r}] has shape {tuple(f[key].shape)}, parameter has {tuple(p0.shape)}"
                    )
                fk = f[key].to(device=p0.device, dtype=acc)
                if not bool(torch.isfinite(fk).all()):
                    raise ValueError(f"wise_ft: {name}[{key!r}] holds NaN or Inf")
                fs.append(fk.clamp_min(fisher_floor))
            c0 = (1.0 - a) * fs[0]
            c1 = a * fs[1]
            merged[key] = ((c0 * p0.to(acc) + c1 * p1.to(acc)) / (c0 + c1)).to(p0.dtype)
    return merged


def wise_ft_sweep(
    model: nn.Module,
    theta_0: Mapping[str, Tensor] | nn.Module,
    theta_1: Mapping[str, Tensor] | nn.Module,
    alphas: Sequence[float],
    evaluate: Callable[[nn.Module], T],
    fishers: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    fisher_floor: float = 1e-8,
) -> list[tuple[float, T]]:
    """Evaluates the WiSE-FT merge at every alpha; returns ``[(alpha, evaluate(merged_model)), ...]``.

    One copy of ``model`` is made; each alpha re-blends into its parameters with ``blend(out=...)``
    (the Fisher merge loads the merged state dict into the same copy). ``evaluate`` receives the copy in
    eval mode, for example ``lambda m: evaluate_accuracy(m, loader)``.
    """
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("wise_ft_sweep: need at least one alpha")
    holder = BlendedModels(model, [theta_0, theta_1], n_models=1)
    results = []
    for a in alphas:
        if fishers is None:
            _check_alpha(a, False)
            holder.blend([[1.0 - a, a]])
        else:
            merged = wise_ft(holder.sources[0], holder.sources[1], a, fishers, fisher_floor)
            with torch.no_grad():
                for key, t in holder.buffers[0].items():
                    t.copy_(merged[key])
        results.append((a, evaluate(holder.models[0])))
    return results


def output_ensemble(
    logits_0: Tensor,
    logits_1: Tensor,
    weight: float | Tensor = 0.5,
    temperatures: tuple[float, float] = (1.0, 1.0),
) -> Tensor:
    """Output-space ensemble: ``(1 - w) * softmax(z0 / T0) + w * softmax(z1 / T1)`` (probabilities [B, C]).

    ``weight`` is a scalar or a per-sample tensor [B] (DaWin's dynamic output ensemble).
    """
    if logits_0.shape != logits_1.shape:
        raise ValueError(f"output_ensemble: logits shapes differ: {tuple(logits_0.shape)} vs {tuple(logits_1.shape)}")
    for t in temperatures:
        if not (math.isfinite(float(t)) and float(t) > 0):
            raise ValueError(f"output_ensemble: temperatures must be finite and > 0, got {tuple(temperatures)}")
    if logits_0.dim() != 2:
        raise ValueError(f"output_ensemble: logits must be [B, C], got {tuple(logits_0.shape)}")
    check_logits_finite(logits_0, "output_ensemble: logits_0")
    check_logits_finite(logits_1, "output_ensemble: logits_1")
    w = torch.as_tensor(weight, dtype=torch.float32).to(logits_0.device)
    if w.dim() > 1 or (w.dim() == 1 and w.shape[0] != logits_0.shape[0]):
        raise ValueError(
            f"output_ensemble: weight must be a scalar or [B] = [{logits_0.shape[0]}], got shape {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError("output_ensemble: weight must be finite")
    if w.dim() == 1:
        w = w.unsqueeze(-1)
    p0 = F.softmax(logits_0.float() / float(temperatures[0]), dim=-1)
    p1 = F.softmax(logits_1.float() / float(temperatures[1]), dim=-1)
    return (1.0 - w) * p0 + w * p1


def diagonal_fisher(
    model: nn.Module,
    loader: Iterable,
    max_samples: int | None = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> StateDict:
    """Diagonal empirical Fisher of ``model``: the mean over samples of squared per-sample gradients of
    the cross-entropy against a label drawn from the model's own softmax (as in wise-ft).

    Gradients are taken one sample at a time (exact per-sample squares). Keys are the model's trainable
    parameters; the model is left in its original mode and its ``.grad`` fields are restored to None.
    """
    gen = torch.Generator().manual_seed(int(seed))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("diagonal_fisher: the model has no trainable parameters")
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in loader:
            x, _ = split_batch(batch)
            if device is not None:
                x = x.to(device)
            for i in range(x.shape[0]):
                if max_samples is not None and n >= max_samples:
                    break
                logits = model(x[i : i + 1])
                probs = F.softmax(logits.detach().float(), dim=-1).cpu()
                label = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)
                loss = F.cross_entropy(logits, label)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (name, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        fisher[name] += g.detach().float() ** 2
                n += 1
            if max_samples is not None and n >= max_samples:
                break
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("diagonal_fisher: the loader yielded no samples")
    return {name: f / n for name, f in fisher.items()}
