"""AdaWiSE: test-time choice of the WiSE-FT coefficient by Bayesian optimisation of prediction entropy.

Each test batch gets its own alpha in [0, 1], the one minimising the interpolated model's mean softmax entropy on
that batch, found by a scikit-learn Gaussian process and expected improvement within ``n_evals`` forward passes.
No public code exists; the design choices (budget, warm start, surrogate, several candidates per pass, ranks) are
listed in the README, "AdaWiSE: the design choices".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Kernel, Matern, WhiteKernel
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from ..exact import SampleWiseInterpolator
from ..ops import softmax_entropy
from ..ops.statedict import as_state_dict, check_finite_state_dict
from .blended import BlendedModels
from .inference import check_logits_finite, split_batch

__all__ = ["AdaWiSE", "make_gp", "expected_improvement"]


def make_gp(previous_kernel: Kernel | None = None, seed: int = 0) -> GaussianProcessRegressor:
    """The surrogate: an unfitted GaussianProcessRegressor, warm-started from ``previous_kernel`` if given."""
    kernel = previous_kernel
    if kernel is None:
        kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(
            length_scale=0.3, length_scale_bounds=(0.03, 10.0), nu=2.5
        ) + WhiteKernel(1e-4, (1e-8, 1e-1))
    return GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2, random_state=seed)


def expected_improvement(mu: np.ndarray, sd: np.ndarray, best: float, xi: float = 0.01) -> np.ndarray:
    """Expected improvement below ``best`` (minimisation) of a Gaussian posterior N(mu, sd^2)."""
    imp = best - mu - xi
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, imp / sd, 0.0)
        return np.where(sd > 0, imp * norm.cdf(z) + sd * norm.pdf(z), 0.0)


class AdaWiSE:
    """Per-batch Bayesian optimisation of the WiSE-FT alpha (see the module docstring for the design).

    Args:
        model: the architecture (outputs logits [B, C]); not modified.
        theta_zs, theta_ft: zero-shot and fine-tuned state dicts or modules matching ``model``.
        n_evals: forward passes (alpha evaluations) per batch, >= n_init.
        n_init: initial points per batch (>= 1).
        warm_start: start each batch from the previous batch's best alpha and fitted kernel.
        seed: random state of the GP hyperparameter restarts.
        grid_size: resolution of the acquisition grid on [0, 1].
        xi: exploration margin of expected improvement.
        candidates_per_pass: alphas scored together in one forward pass of the exact per-sample
            interpolator (1 = one blend + forward per alpha).

    After each :meth:`predict`, ``history_`` holds one dict per batch with the evaluated ``alphas``,
    their ``objectives`` (mean entropies) and the chosen ``alpha``; ``best_alpha_`` is the latest choice.
    """

    def __init__(
        self,
        model: nn.Module,
        theta_zs: Mapping[str, Tensor] | nn.Module,
        theta_ft: Mapping[str, Tensor] | nn.Module,
        *,
        n_evals: int = 8,
        n_init: int = 3,
        warm_start: bool = True,
        seed: int = 0,
        grid_size: int = 201,
        xi: float = 0.01,
        candidates_per_pass: int = 1,
    ) -> None:
        if int(candidates_per_pass) < 1:
            raise ValueError(f"AdaWiSE: candidates_per_pass must be >= 1, got {candidates_per_pass}")
        if int(n_init) < 1:
            raise ValueError(f"AdaWiSE: n_init must be >= 1, got {n_init}")
        if int(n_evals) < int(n_init):
            raise ValueError(f"AdaWiSE: n_evals ({n_evals}) must be >= n_init ({n_init})")
        if int(grid_size) < 2:
            raise ValueError(f"AdaWiSE: grid_size must be >= 2, got {grid_size}")
        self.n_evals, self.n_init = int(n_evals), int(n_init)
        self.warm_start, self.seed = bool(warm_start), int(seed)
        self.grid = np.linspace(0.0, 1.0, int(grid_size))
        self.xi = float(xi)
        sources = [as_state_dict(theta_zs, "theta_zs"), as_state_dict(theta_ft, "theta_ft")]
        self.holder = BlendedModels(model, sources, n_models=1)  # checks compatibility first
        check_finite_state_dict(sources[0], "AdaWiSE: theta_zs")
        check_finite_state_dict(sources[1], "AdaWiSE: theta_ft")
        self.device = next(iter(sources[0].values())).device
        self.candidates_per_pass = int(candidates_per_pass)
        self._model, self._sources = model, sources
        self._exact = None  # SampleWiseInterpolator, built on first use when candidates_per_pass > 1
        self.reset()

    def reset(self) -> None:
        """Forgets the warm-start state and the history."""
        self.best_alpha_: float | None = None
        self._kernel: Kernel | None = None
        self.history_: list[dict] = []

    def _initial_points(self) -> list[float]:
        if self.warm_start and self.best_alpha_ is not None:
            rest = np.linspace(0.0, 1.0, self.n_init - 1).tolist() if self.n_init > 1 else []
            return [self.best_alpha_, *rest]
        return np.linspace(0.0, 1.0, self.n_init).tolist() if self.n_init > 1 else [0.5]

    @torch.no_grad()
    def _evaluate(self, x: Tensor, alpha: float) -> tuple[float, Tensor]:
        self.holder.blend([[1.0 - alpha, alpha]])
        logits = self.holder.models[0](x)
        check_logits_finite(logits, f"AdaWiSE model at alpha={alpha:.4f}")
        return float(softmax_entropy(logits).mean()), logits

    @torch.no_grad()
    def _evaluate_many(self, x: Tensor, alphas: list[float]) -> list[tuple[float, Tensor]]:
        """Scores several alphas; with ``candidates_per_pass > 1`` in one exact per-sample pass."""
        if self.candidates_per_pass == 1 or len(alphas) == 1:
            return [self._evaluate(x, a) for a in alphas]
        if self._exact is None:
            self._exact = SampleWiseInterpolator(self._model, self._sources)
        rows = torch.tensor([[1.0 - a, a] for a in alphas], dtype=torch.float32, device=self.device)
        out = self._exact.forward_candidates(x, rows)  # [q, B, C]
        results = []
        for a, logits in zip(alphas, out, strict=True):
            check_logits_finite(logits, f"AdaWiSE model at alpha={a:.4f}")
            results.append((float(softmax_entropy(logits).mean()), logits))
        return results

    def _propose(self, xs: list[float], ys: list[float], q: int) -> tuple[list[float], Kernel]:
        """Up to ``q`` new alphas by expected improvement, the later ones by the constant-liar rule."""
        gp = make_gp(self._kernel if self.warm_start else None, self.seed)
        px, py, picks = list(xs), list(ys), []
        # A handful of points: BLAS threads only add contention to a GP fit this small.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            gp.fit(np.asarray(px)[:, None], np.asarray(py))
            kernel = gp.kernel_
            for i in range(q):
                if i > 0:  # refit on the lie with the fitted kernel held fixed
                    gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, optimizer=None)
                    gp.fit(np.asarray(px)[:, None], np.asarray(py))
                mu, sd = gp.predict(self.grid[:, None], return_std=True)
                ei = expected_improvement(mu, sd, min(py), self.xi)
                for b in px:
                    ei[np.abs(self.grid - b) < 1e-9] = -np.inf
                if not np.isfinite(ei).any():
                    break
                a = float(self.grid[int(np.argmax(ei))])
                picks.append(a)
                px.append(a)
                py.append(min(ys))
        return picks, kernel

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Chooses alpha for this batch by Bayesian optimisation and returns that model's logits [B, C]."""
        if x.shape[0] == 0:
            raise ValueError("AdaWiSE: empty batch")
        x = x.to(self.device)
        xs: list[float] = []
        ys: list[float] = []
        best_logits: Tensor | None = None

        def observe(alphas: list[float]) -> None:
            nonlocal best_logits
            for a, (y, logits) in zip(alphas, self._evaluate_many(x, alphas), strict=True):
                if not ys or y < min(ys):
                    best_logits = logits
                xs.append(a)
                ys.append(y)

        initial: list[float] = []
        for a in self._initial_points():
            if not any(abs(a - b) < 1e-9 for b in initial):
                initial.append(float(a))
        observe(initial)
        kernel = None
        while len(xs) < self.n_evals:
            q = self.candidates_per_pass if self.candidates_per_pass > 1 else 1
            picks, kernel = self._propose(xs, ys, min(q, self.n_evals - len(xs)))
            if not picks:
                break
            observe(picks)
        if kernel is not None:
            self._kernel = kernel
        i = int(np.argmin(ys))
        self.best_alpha_ = xs[i]
        self.history_.append({"alphas": list(xs), "objectives": list(ys), "alpha": xs[i]})
        assert best_logits is not None
        return best_logits

    @torch.no_grad()
    def predict_dataset(self, loader: Iterable) -> Tensor:
        """Runs :meth:`predict` on every batch of ``loader`` (x or (x, y)); returns logits [N, C]."""
        outs = [self.predict(split_batch(batch)[0]) for batch in loader]
        if not outs:
            raise ValueError("AdaWiSE: the loader yielded no batches")
        return torch.cat(outs)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Writes the settings and the warm-start state (``best_alpha_``, the fitted GP kernel's
        hyperparameters, ``history_``) to directory ``path``, with content hashes of both weight sets."""
        from .persistence import save_adawise

        return save_adawise(self, path)

    # The same signature as DaWin.load on purpose: every fitted method reloads from (path, model, weights).
    @classmethod
    def load(
        cls,
        path,
        model: nn.Module,
        theta_zs: Mapping[str, Tensor] | nn.Module,
        theta_ft: Mapping[str, Tensor] | nn.Module,
    ) -> AdaWiSE:
        """Rebuilds AdaWiSE from :meth:`save`'s directory so that the next batch warm-starts where the saved one
        stopped. Refuses weights that differ from the saved ones (naming the keys)."""
        from .persistence import load_adawise

        return load_adawise(cls, path, model, theta_zs, theta_ft)
