"""The benchmark end to end: data, the two models (trained or cached), every method, λ statistics."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import TEST_SHIFTS, load_digits_splits, make_test_sets, normalize
from .methods import all_methods
from .scoring import EvalContext, MethodResult, NotAvailable, choose_alpha, evaluate_methods, wise_ft_curve
from .train import TrainConfig, TrainedPair, train_pair

__all__ = ["DemoConfig", "DemoResult", "run_benchmark", "ALPHA_GRID"]

#: WiSE-FT alphas swept for the curve and for choosing alpha on the ID validation split.
ALPHA_GRID = [round(0.1 * i, 1) for i in range(11)]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one run. The defaults are the full benchmark; tests shrink them."""

    train: TrainConfig = field(default_factory=TrainConfig)
    # Evaluate on only the first n test images of every set (None: all).
    test_subset: int | None = None
    repeats: int = 5
    cache_dir: Path | None = None
    retrain: bool = False


@dataclass
class LambdaFit:
    """DaWin's λ on one evaluation set and the Beta mixture fitted to it (None when unavailable)."""

    lambdas: np.ndarray
    mixture: object | None
    note: str = ""


@dataclass
class DemoResult:
    """Everything the report shows, all computed in this run."""

    config: DemoConfig
    pair: TrainedPair
    alpha_val: float
    val_curve: list[tuple[float, dict[str, float]]]
    curve: list[tuple[float, dict[str, float]]]
    methods: list[MethodResult]
    lambda_fits: dict[str, LambdaFit]
    set_names: list[str]
    n_val: int
    environment: dict
    seconds: dict[str, float]

    def method(self, name_prefix: str) -> MethodResult:
        for m in self.methods:
            if m.name.startswith(name_prefix):
                return m
        raise KeyError(f"no method named {name_prefix!r}...; have {[m.name for m in self.methods]}")


def environment_info(threads: int) -> dict:
    """Versions and the device, read from the running system."""
    import dawin_ext

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import sklearn

    return {
        "device": f"CPU: {cpu} ({os.cpu_count()} logical cores, torch threads {threads})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
        "dawin_ext build_info": dawin_ext.build_info(),
        "platform": platform.platform(),
        # Other processes on the machine slow every timing; the load says how busy it was.
        "load average (1, 5, 15 min) at the end": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
    }


def _lambda_fits(ctx: EvalContext, sets: dict[str, tuple[Tensor, Tensor]], seed: int) -> dict[str, LambdaFit]:
    """λ(x) = e^{-H_ft} / (e^{-H_zs} + e^{-H_ft}) per set (``dawin_ext.entropy_coefficients``), plus a K=3 Beta
    mixture fit (``dawin_ext.methods.mixture.BetaMixture``) for the histogram."""
    from dawin_ext import entropy_coefficients

    try:
        from dawin_ext.methods.mixture import BetaMixture
    except ImportError as err:  # pragma: no cover - scipy or scikit-learn missing
        BetaMixture, why = None, f"dawin_ext.methods.mixture not importable ({err})"
    fits = {}
    for name, (x, _) in sets.items():
        with torch.no_grad():
            coef = entropy_coefficients([ctx.generalist(x), ctx.specialist(x)]).coefficients
        lam = coef[:, 1].double().numpy()
        mixture, note = None, ""
        if BetaMixture is None:
            note = why
        else:
            try:
                mixture = BetaMixture(n_components=3, seed=seed).fit(lam)
            except ValueError as err:
                note = f"Beta mixture not fitted: {err}"
        fits[name] = LambdaFit(lam, mixture, note)
    return fits


def run_benchmark(config: DemoConfig | None = None, log=print) -> DemoResult:
    """Runs the whole benchmark and returns its results (the report is written separately)."""
    cfg = config or DemoConfig()
    log = log or (lambda _msg: None)
    tc = cfg.train
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    data = load_digits_splits(tc.seed, size=tc.image_size)
    pair = train_pair(data, tc, cfg.cache_dir, retrain=cfg.retrain)
    timings["training"] = 0.0 if pair.from_cache else pair.train_seconds
    log(
        f"models: {'loaded from cache' if pair.from_cache else f'trained in {pair.train_seconds:.1f} s'} "
        f"({pair.generalist_path.parent})"
    )

    x_test, y_test = data.x_test, data.y_test
    if cfg.test_subset is not None:
        x_test, y_test = x_test[: cfg.test_subset], y_test[: cfg.test_subset]
    raw_sets = make_test_sets(x_test, y_test, tc.seed)
    sets = {name: (normalize(x), y) for name, (x, y) in raw_sets.items()}
    val = {"val": (normalize(data.x_val), data.y_val)}

    t0 = time.perf_counter()
    val_curve = wise_ft_curve(pair.generalist, pair.specialist, ALPHA_GRID, val)
    alpha_val = choose_alpha(val_curve)
    curve = wise_ft_curve(pair.generalist, pair.specialist, ALPHA_GRID, sets)
    timings["WiSE-FT curve"] = time.perf_counter() - t0
    log(f"WiSE-FT alpha chosen on the ID validation split ({len(data.y_val)} images): {alpha_val}")

    ctx = EvalContext(pair.generalist, pair.specialist, alpha_val, tc.seed)
    t0 = time.perf_counter()
    methods = evaluate_methods(all_methods(alpha_val), ctx, sets, repeats=cfg.repeats, log=log)
    timings["methods"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        fits = _lambda_fits(ctx, sets, tc.seed)
    except NotAvailable as err:  # pragma: no cover
        fits = {name: LambdaFit(np.array([]), None, str(err)) for name in sets}
    timings["λ fits"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    assert list(sets) == ["ID", *[name for name, _, _ in TEST_SHIFTS]]
    return DemoResult(
        config=cfg,
        pair=pair,
        alpha_val=alpha_val,
        val_curve=val_curve,
        curve=curve,
        methods=methods,
        lambda_fits=fits,
        set_names=list(sets),
        n_val=len(data.y_val),
        environment=environment_info(torch.get_num_threads()),
        seconds=timings,
    )
