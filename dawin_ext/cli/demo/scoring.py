"""Runs every method on every evaluation set, measuring accuracy and inference time.

Each method is a function ``predict(x) -> labels [N]`` over one whole evaluation set of normalized images;
everything a method needs at test time (both models' logits, the λ fit, merging weights) happens inside it
and is timed. A method whose implementation is not in the package is listed with ``available=False`` and
its reason; it never gets a row of numbers.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["MethodResult", "EvalContext", "Method", "evaluate_methods", "accuracy", "wise_ft_curve", "choose_alpha"]

Predict = Callable[[Tensor], Tensor]


@dataclass
class MethodResult:
    """One method's outcome. ``accuracy`` and ``n_samples`` are keyed by evaluation set (``"ID"`` first)."""

    name: str
    available: bool
    note: str = ""
    accuracy: dict[str, float] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    seconds: float = float("nan")
    relative_cost: float = float("nan")
    # Per-set details a method reports about itself (for example AdaWiSE's chosen alphas).
    details: dict[str, str] = field(default_factory=dict)

    @property
    def id_accuracy(self) -> float:
        return self.accuracy["ID"]

    @property
    def ood_average(self) -> float:
        ood = [v for k, v in self.accuracy.items() if k != "ID"]
        return statistics.fmean(ood) if ood else float("nan")


@dataclass
class EvalContext:
    """What the methods share: the two models, their state dicts and the settings chosen before testing."""

    generalist: nn.Module
    specialist: nn.Module
    alpha_val: float
    seed: int
    extras: dict = field(default_factory=dict)


@dataclass
class Method:
    """A named test-time method; ``build`` returns its predictor, or raises :class:`NotAvailable`."""

    name: str
    build: Callable[[EvalContext], Predict]
    description: str = ""


class NotAvailable(RuntimeError):
    """The method's implementation is missing from the package (the reason says what)."""


def optional_import(module: str, *names: str):
    """Imports ``names`` from ``dawin_ext.<module>``; raises :class:`NotAvailable` naming what is missing."""
    try:
        mod = importlib.import_module(f"dawin_ext.{module}")
    except ImportError as err:
        raise NotAvailable(f"dawin_ext.{module} is not importable ({err})") from err
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise NotAvailable(f"dawin_ext.{module} has no {', '.join(missing)}")
    return [getattr(mod, n) for n in names]


@torch.no_grad()
def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy; predictions and labels must be [N] with the same N."""
    if predictions.shape != labels.shape:
        raise ValueError(f"accuracy: predictions {tuple(predictions.shape)} vs labels {tuple(labels.shape)}")
    return float((predictions == labels).double().mean())


def _timed(fn: Predict, x: Tensor, repeats: int, slow_seconds: float = 0.5) -> tuple[Tensor, float]:
    """Returns ``fn(x)`` and its wall time.

    The first run is a warm-up; then ``repeats`` timed runs give the median. A method whose first run already
    takes ``slow_seconds`` or more is timed by that run alone (its start-up costs are negligible next to it, and
    repeating it would blow the demo's time budget).
    """
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(x)
    first = time.perf_counter() - t0
    if first >= slow_seconds:
        return out, first
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        with torch.no_grad():
            y = fn(x)
        times.append(time.perf_counter() - t0)
        if not torch.equal(out, y):
            # A method must be deterministic for a fixed input; anything else would make the table irreproducible.
            raise RuntimeError("a method gave different predictions on a repeated run over the same inputs")
    return out, statistics.median(times)


def evaluate_methods(
    methods: list[Method],
    ctx: EvalContext,
    sets: dict[str, tuple[Tensor, Tensor]],
    repeats: int = 3,
    log: Callable[[str], None] | None = None,
) -> list[MethodResult]:
    """Evaluates every method on every set (inputs already normalized).

    The relative cost is the method's total wall time over all sets divided by one plain forward pass of the
    generalist over the same sets, both medians of ``repeats`` runs, measured in this call.
    """
    plain = ctx.generalist
    # The denominator of every ratio: timed with extra repeats, since it is the smallest and noisiest figure.
    base_seconds = sum(_timed(lambda x: plain(x).argmax(-1), x, 3 * repeats)[1] for x, _ in sets.values())
    results = []
    for method in methods:
        try:
            predict = method.build(ctx)
        except NotAvailable as err:
            results.append(MethodResult(method.name, False, note=f"not available: {err}"))
            if log:
                log(f"  {method.name}: not available ({err})")
            continue
        res = MethodResult(method.name, True, note=method.description)
        total = 0.0
        for set_name, (x, y) in sets.items():
            pred, seconds = _timed(predict, x, repeats)
            if pred.shape != y.shape:
                raise RuntimeError(
                    f"{method.name} on {set_name}: predicted shape {tuple(pred.shape)}, want {tuple(y.shape)}"
                )
            res.accuracy[set_name] = accuracy(pred, y)
            res.n_samples[set_name] = int(y.numel())
            if getattr(predict, "details", ""):
                res.details[set_name] = predict.details
            total += seconds
        res.seconds = total
        res.relative_cost = total / base_seconds
        results.append(res)
        if log:
            log(
                f"  {method.name}: ID {res.id_accuracy:.3f}  OOD avg {res.ood_average:.3f}  cost {res.relative_cost:.1f}x"
            )
    return results


@torch.no_grad()
def wise_ft_curve(
    generalist: nn.Module,
    specialist: nn.Module,
    alphas: list[float],
    sets: dict[str, tuple[Tensor, Tensor]],
) -> list[tuple[float, dict[str, float]]]:
    """Accuracy on every set of the WiSE-FT merge at each alpha, via ``dawin_ext.methods.wise_ft.wise_ft_sweep``."""
    (wise_ft_sweep,) = optional_import("methods.wise_ft", "wise_ft_sweep")

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {name: accuracy(model(x).argmax(-1), y) for name, (x, y) in sets.items()}

    return wise_ft_sweep(generalist, generalist, specialist, alphas, evaluate)


def choose_alpha(curve_on_val: list[tuple[float, dict[str, float]]], key: str = "val") -> float:
    """The alpha with the best accuracy on the ID validation split (the smallest such alpha on ties)."""
    best = max(acc[key] for _, acc in curve_on_val)
    return min(a for a, acc in curve_on_val if acc[key] == best)
