"""Plain mirrors of the published algorithms, for tests and benchmarks to compare the fast path against.

They follow the procedures of the public reference code (naver-ai/dawin, mlfoundations/wise-ft) step by
step, in plain NumPy / PyTorch: dict-comprehension merges, a fresh merge for every cluster present in
every batch, explicit log-density formulas. They are deliberately slow and keep the reference's
limitations (for example ``log(0)`` for a coefficient of exactly 0 or 1); do not use them in production.

They import nothing from the code they check (only :mod:`dawin_ext.testing.reference_ops` and NumPy / SciPy /
scikit-learn / PyTorch; ``tests/test_mirrors_independent.py`` checks this): a shared helper would let a bug in it
pass on both sides. The Beta and Dirichlet mixtures take their initial responsibilities from scikit-learn's
``KMeans``, as the reference code and ``dawin_ext.methods.mixture`` both do.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import betaln, gammaln, logsumexp
from scipy.stats import norm
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from .reference_ops import entropy_reference, interpolation_reference, offset_ratio_reference

__all__ = [
    "beta_mixture_reference",
    "dirichlet_mixture_reference",
    "wise_ft_reference",
    "dawin_coefficients_reference",
    "dawin_cluster_loop_reference",
    "multitask_coefficients_reference",
    "multitask_merge_reference",
    "adawise_reference",
]

_EPS10 = 10 * np.finfo(np.float64).eps


# ------------------------------------------------------------------------------------------ mixtures
def _kmeans_onehot(data: np.ndarray, k: int, random_state: int) -> np.ndarray:
    # Deliberate independent mirror of dawin_ext.methods.mixture._kmeans_responsibilities (tests compare the two).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lab = KMeans(n_clusters=k, n_init=1, random_state=random_state).fit(data).labels_
    onehot = np.zeros((data.shape[0], k))
    onehot[np.arange(data.shape[0]), lab] = 1
    return onehot


def beta_mixture_reference(
    data, n_mixtures: int = 3, seed: int = 1, num_init: int = 3, max_iter: int = 1000, tol: float = 1e-4
) -> dict:
    """The reference ``BetaMixtureModel.fit`` + ``predict`` on lambda [N] (or [N, 1]).

    Returns ``{"labels", "means", "weights", "params", "lower_bound"}``; ``params`` is [K, 2] (a, b).
    """
    x = np.asarray(data, dtype=np.float64).reshape(-1, 1)
    n = x.shape[0]

    def m_step(log_resp):
        resp = np.exp(log_resp)
        counts = resp.sum(axis=0) + _EPS10
        weights = counts / counts.sum()
        s1 = resp.T @ x
        s2 = resp.T @ (x**2)
        params = np.zeros((n_mixtures, 2))
        for k in range(n_mixtures):
            m = s1[k] / counts[k]
            v = s2[k] / counts[k] - m**2
            v = np.minimum(v, m * (1 - m) / 4)
            v = v + _EPS10
            f = m * (1 - m) / (v + 1e-10) - 1
            params[k, 0] = (f * m)[0]
            params[k, 1] = (f * (1 - m))[0]
        return weights, params, counts

    # Deliberate independent mirror of BetaMixture._log_resp (the EM loop below mirrors _EMMixture._run_em). The
    # Dirichlet mirror repeats this E-step and loop on purpose: each mirror follows its own upstream reference
    # (DaWin's BetaMixtureModel, the multi-task DirichletMixtureModel) line by line, so it can be read against it.
    def e_step(weights, params):
        lp = np.empty((n, n_mixtures))
        for k in range(n_mixtures):
            a, b = params[k, 0], params[k, 1]
            lp[:, k] = ((a - 1) * np.log(x) + (b - 1) * np.log(1 - x) - betaln(a, b)).sum(axis=1)
        wlp = lp + np.log(weights)
        lpn = logsumexp(wlp, axis=1)
        with np.errstate(under="ignore"):
            return lpn, wlp - lpn[:, None]

    best_bound, best = -np.inf, None
    for r in range(num_init):
        resp = _kmeans_onehot(x, n_mixtures, seed + r) + _EPS10
        weights, params, _ = m_step(np.log(resp))
        bound = -np.inf
        for _ in range(max_iter):
            prev = bound
            lpn, log_resp = e_step(weights, params)
            weights, params, _ = m_step(log_resp)
            bound = np.mean(lpn)
            if abs(bound - prev) < tol:
                break
        if bound > best_bound:
            best_bound = bound
            best = (weights.copy(), params.copy())
    weights, params = best
    _, log_resp = e_step(weights, params)
    return {
        "labels": np.argmax(np.exp(log_resp), axis=1),
        "means": params[:, 0] / params.sum(axis=1),
        "weights": weights,
        "params": params,
        "lower_bound": best_bound,
    }


def dirichlet_mixture_reference(
    data, n_clusters: int, seed: int = 0, n_init: int = 5, max_iter: int = 500, tol: float = 1e-5
) -> dict:
    """The reference multi-task ``DirichletMixtureModel`` procedure with an explicit cluster count.

    (The reference uses the data dimension as its cluster count and predicts with its last restart's
    parameters; this mirror takes ``n_clusters`` and the best restart, as dawin-ext does.)
    Returns ``{"labels", "params", "weights", "lower_bound"}``.
    """
    x = np.asarray(data, dtype=np.float64)
    n = x.shape[0]

    def m_step(log_resp):
        resp = np.exp(log_resp)
        nk = resp.sum(axis=0) + 1e-14
        params = np.zeros((n_clusters, x.shape[1]))
        for k in range(n_clusters):
            params[k] = (resp[:, k] @ x) / nk[k]
        return nk / nk.sum(), params

    # Deliberate independent mirror of DirichletMixture._log_resp (see the Beta mirror's e_step above).
    def e_step(weights, params):
        lp = np.empty((n, n_clusters))
        for k in range(n_clusters):
            a = params[k]
            lp[:, k] = gammaln(a.sum()) - np.sum(gammaln(a)) + np.sum((a - 1) * np.log(x), axis=1)
        wlp = lp + np.log(weights)
        lpn = logsumexp(wlp, axis=1)
        with np.errstate(under="ignore"):
            return lpn, wlp - lpn[:, None]

    best_bound, best = -np.inf, None
    for r in range(n_init):
        resp = _kmeans_onehot(x, n_clusters, seed + r) + 1e-14
        weights, params = m_step(np.log(resp))
        bound = -np.inf
        for _ in range(max_iter):
            prev = bound
            lpn, log_resp = e_step(weights, params)
            weights, params = m_step(log_resp)
            bound = lpn.mean()
            if abs(bound - prev) < tol:
                break
        if bound > best_bound:
            best_bound, best = bound, (weights.copy(), params.copy())
    weights, params = best
    _, log_resp = e_step(weights, params)
    return {
        "labels": np.argmax(np.exp(log_resp), axis=1),
        "params": params,
        "weights": weights,
        "lower_bound": best_bound,
    }


# ------------------------------------------------------------------------------------------ WiSE-FT
def wise_ft_reference(alpha, theta_0, theta_1, fishers=None, fisher_floor: float = 1e-8) -> dict[str, Tensor]:
    """wise-ft's merge: plain interpolation, or the Fisher-weighted version with ones for missing keys."""
    if fishers is None:
        return {k: (1 - alpha) * theta_0[k] + alpha * theta_1[k] for k in theta_0}
    f0, f1 = fishers
    out = {}
    for k in theta_0:
        assert (k in f0) == (k in f1)
        ones = torch.ones_like(theta_0[k])
        a0 = torch.maximum(f0.get(k, ones), fisher_floor * ones)
        a1 = torch.maximum(f1.get(k, ones), fisher_floor * ones)
        c0, c1 = (1 - alpha) * a0, alpha * a1
        out[k] = (c0 * theta_0[k] + c1 * theta_1[k]) / (c0 + c1)
    return out


# ------------------------------------------------------------------------------------------ DaWin
def dawin_coefficients_reference(
    zs_logits: Tensor,
    ft_logits: Tensor,
    expertise: str = "entropy",
    temperatures=(1.0, 1.0),
    offset_adjustment: bool = False,
    pseudo_label: str = "ensemble_soft",
    merged_logits: Tensor | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """The reference ``build_datastore`` coefficient for each expertise metric (dawin-ext names)."""
    t0, t1 = temperatures
    zs_ent = entropy_reference(zs_logits, t0)
    ft_ent = entropy_reference(ft_logits, t1)
    if expertise == "selective":
        return (zs_ent > ft_ent).int().float()
    if expertise == "max_logit":
        a, b = zs_logits.max(dim=1)[0], ft_logits.max(dim=1)[0]
        return b / (a + b)
    if expertise == "cross_entropy":
        p0, p1 = F.softmax(zs_logits / t0, dim=1), F.softmax(ft_logits / t1, dim=1)
        target = {
            "ensemble_soft": lambda: (p0 + p1) / 2,
            "merged_soft": lambda: F.softmax(merged_logits, dim=1),
            "ensemble_hard": lambda: torch.argmax(p0 + p1, dim=1),
            "merged_hard": lambda: torch.argmax(merged_logits, dim=1),
            "true": lambda: labels,
        }[pseudo_label]()
        if target.dim() == 2:
            zs_s = (-target * F.log_softmax(zs_logits, 1)).sum(1)
            ft_s = (-target * F.log_softmax(ft_logits, 1)).sum(1)
        else:
            zs_s = F.cross_entropy(zs_logits, target, reduction="none")
            ft_s = F.cross_entropy(ft_logits, target, reduction="none")
    else:  # entropy and the dynamic output ensemble's coefficient
        zs_s, ft_s = zs_ent, ft_ent
    return offset_ratio_reference(zs_s, ft_s, offset_adjustment)


@torch.no_grad()
def dawin_cluster_loop_reference(
    base_model: nn.Module,
    theta_zs: Mapping[str, Tensor],
    theta_ft: Mapping[str, Tensor],
    batches: Sequence[Tensor],
    cluster_labels,
    cluster_means,
    scratch: nn.Module | None = None,
) -> Tensor:
    """The reference's cluster-wise evaluation loop: for every batch and every cluster present in it,
    merge the full state dict again, load it into the model and run that sub-batch. Returns logits in
    input order (the reference concatenates them cluster by cluster).

    Each merge is loaded into ``scratch`` (by default a copy of ``base_model``, which is left untouched); a
    benchmark passes its own module so that the timing leaves out the copy."""
    model = copy.deepcopy(base_model).eval() if scratch is None else scratch
    labels = np.asarray(cluster_labels)
    outs, start = [], 0
    for x in batches:
        idx = labels[start : start + x.shape[0]]
        start += x.shape[0]
        logits = None
        for j in np.unique(idx):
            sub = torch.from_numpy(idx == j)
            merged = interpolation_reference(float(cluster_means[j]), theta_zs, theta_ft)
            model.load_state_dict(merged)
            z = model(x[sub])
            if logits is None:
                logits = z.new_empty((x.shape[0], z.shape[1]))
            logits[sub] = z
        outs.append(logits)
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------ multi-task
def multitask_coefficients_reference(task_logits: Sequence[Tensor]) -> Tensor:
    """pi(x) = softmax over tasks of -H_t(x) (no temperature); returns [N, T]."""
    negent = torch.stack([-entropy_reference(z) for z in task_logits], dim=1)
    return F.softmax(negent, dim=1)


def multitask_merge_reference(
    theta_0: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]], pi, scale: float = 0.3
) -> dict[str, Tensor]:
    """theta_0 + sum_t (scale * T) * pi_t * tau_t, one key at a time as the reference does."""
    n = len(task_vectors)
    row = [1.0] + [scale * n * float(p) for p in pi]
    params = [theta_0, *task_vectors]
    return {k: sum(c * sd[k] for c, sd in zip(row, params, strict=True)) for k in theta_0}


# ------------------------------------------------------------------------------------------ AdaWiSE
def _adawise_gp(previous_kernel, seed: int) -> GaussianProcessRegressor:
    """AdaWiSE's surrogate, written out here from scikit-learn (not imported from ``dawin_ext.methods.adawise``): a
    ``Constant * Matern(nu=2.5) + White`` kernel with ``normalize_y=True`` and 2 optimizer restarts; the bounds
    and starting values restate the design of ``dawin_ext/methods/adawise.py``, so a change there fails the tests that
    compare against this mirror. A warm start passes the previous batch's fitted kernel."""
    # Deliberate independent mirror of dawin_ext.methods.adawise.make_gp: written out, never imported.
    kernel = previous_kernel
    if kernel is None:
        kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(
            length_scale=0.3, length_scale_bounds=(0.03, 10.0), nu=2.5
        ) + WhiteKernel(1e-4, (1e-8, 1e-1))
    return GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2, random_state=seed)


def adawise_reference(
    base_model: nn.Module,
    theta_zs: Mapping[str, Tensor],
    theta_ft: Mapping[str, Tensor],
    batches: Sequence[Tensor],
    n_evals: int = 8,
    n_init: int = 3,
    warm_start: bool = True,
    grid_size: int = 201,
    xi: float = 0.01,
    seed: int = 0,
) -> tuple[list[float], list[Tensor]]:
    """Plain AdaWiSE: per batch, Bayesian optimisation of the mean prediction entropy over alpha with a
    full dict-comprehension merge and ``load_state_dict`` per evaluation, its own Gaussian process
    (:func:`_adawise_gp`, random state ``seed``) and its own expected improvement (minimisation, margin ``xi``,
    on a grid of ``grid_size`` alphas, evaluated points excluded, ties to the smallest alpha).
    Shares no code with ``dawin_ext.methods.adawise``. Returns (best alpha, logits) per batch."""
    model = copy.deepcopy(base_model).eval()
    grid = np.linspace(0.0, 1.0, grid_size)
    prev_best, prev_kernel = None, None
    alphas_out, logits_out = [], []
    for x in batches:
        if warm_start and prev_best is not None:
            init = [prev_best, *np.linspace(0.0, 1.0, n_init - 1).tolist()] if n_init > 1 else [prev_best]
        else:
            init = np.linspace(0.0, 1.0, n_init).tolist() if n_init > 1 else [0.5]
        xs, ys, zs = [], [], []

        def evaluate(a, x=x, xs=xs, ys=ys, zs=zs):
            model.load_state_dict(interpolation_reference(a, theta_zs, theta_ft))
            with torch.no_grad():
                z = model(x)
            xs.append(a)
            ys.append(float(entropy_reference(z.float()).mean()))
            zs.append(z)

        for a in init:
            if not any(abs(a - b) < 1e-9 for b in xs):
                evaluate(float(a))
        gp = None
        while len(xs) < n_evals:
            gp = _adawise_gp(prev_kernel if warm_start else None, seed)
            with warnings.catch_warnings(), threadpool_limits(1):
                warnings.simplefilter("ignore", ConvergenceWarning)
                gp.fit(np.array(xs)[:, None], np.array(ys))
                mu, sd = gp.predict(grid[:, None], return_std=True)
            imp = min(ys) - mu - xi
            with np.errstate(divide="ignore", invalid="ignore"):
                zz = np.where(sd > 0, imp / sd, 0.0)
                ei = np.where(sd > 0, imp * norm.cdf(zz) + sd * norm.pdf(zz), 0.0)
            for b in xs:
                ei[np.abs(grid - b) < 1e-9] = -np.inf
            evaluate(float(grid[int(np.argmax(ei))]))
        if gp is not None:
            prev_kernel = gp.kernel_
        i = int(np.argmin(ys))
        prev_best = xs[i]
        alphas_out.append(xs[i])
        logits_out.append(zs[i])
    return alphas_out, logits_out
