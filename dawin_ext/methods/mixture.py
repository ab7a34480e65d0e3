"""Mixture models that group DaWin's per-sample coefficients into a few clusters.

* :class:`BetaMixture` clusters the two-model coefficient lambda in [0, 1] (robust fine-tuning).
* :class:`DirichletMixture` clusters the multi-task coefficient vectors pi on the simplex.

Both follow the EM procedure of the public DaWin code (naver-ai/dawin): responsibilities initialised from
one scikit-learn k-means run per restart (``random_state = seed + restart``), a few restarts, the restart
with the best mean log-likelihood kept, and a moment-matching M-step. The differences are deliberate and
documented on each class: values of exactly 0 or 1 are clipped instead of producing ``log(0)``, and
inputs are validated before any work.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import gammaln, logsumexp
from scipy.stats import beta as beta_dist
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

__all__ = ["BetaMixture", "DirichletMixture"]

# The reference adds ten float64 machine epsilons to responsibilities, cluster sizes and variances.
_TINY = 10 * np.finfo(np.float64).eps


def _as_1d_unit_interval(values, what: str) -> np.ndarray:
    x = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array of coefficients (or [N, 1]), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{what}: got no samples")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"{what}: sample {bad[0]} is {x[bad[0]]}; coefficients must be finite")
    out = np.flatnonzero((x < 0) | (x > 1))
    if out.size:
        raise ValueError(f"{what}: sample {out[0]} is {x[out[0]]}, outside [0, 1]")
    return x


def _kmeans_responsibilities(data: np.ndarray, n_components: int, random_state: int) -> np.ndarray:
    with warnings.catch_warnings():
        # Fewer distinct values than clusters is allowed: the extra components stay (nearly) empty.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=n_components, n_init=1, random_state=random_state).fit(data).labels_
    resp = np.zeros((data.shape[0], n_components))
    resp[np.arange(data.shape[0]), labels] = 1.0
    return resp


def _check_em_settings(what: str, n_components: int, n_init: int, max_iter: int) -> None:
    if int(n_components) < 1:
        raise ValueError(f"{what}: n_components must be >= 1, got {n_components}")
    if int(n_init) < 1 or int(max_iter) < 1:
        raise ValueError(f"{what}: n_init and max_iter must be >= 1, got {n_init} and {max_iter}")


def _check_n_components(n_components: int, x: np.ndarray, what: str) -> None:
    if n_components > x.shape[0]:
        raise ValueError(f"{what}: n_components={n_components} is more than the {x.shape[0]} samples")


class _EMMixture:
    """What the two mixtures share: the settings, the restart-and-EM loop, and ``predict``.

    A subclass sets ``_name`` and ``_init_eps`` (added to the k-means responsibilities) and defines
    ``_prepare(values)``, ``_kmeans_data(x)``, ``_m_step(x, resp) -> params`` (a tuple whose first entry is
    the component weights) and ``_log_resp(x, *params) -> (log normaliser, log responsibilities)``.
    """

    _name = ""
    _init_eps = 0.0

    def __init__(self, n_components: int, seed: int, n_init: int, max_iter: int, tol: float, clip_eps: float) -> None:
        _check_em_settings(self._name, n_components, n_init, max_iter)
        self.n_components = int(n_components)
        self.seed = int(seed)
        self.n_init = int(n_init)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.clip_eps = float(clip_eps)

    def _kmeans_data(self, x: np.ndarray) -> np.ndarray:
        return x

    def _run_em(self, x: np.ndarray):
        """Per restart: k-means responsibilities, then EM until the mean log-likelihood moves by less than
        ``tol``. Returns ``(bound, params, converged, n_iter)`` of the restart with the best finite bound, or
        None if no restart ended finite."""
        _check_n_components(self.n_components, x, self._name)
        best = None
        for restart in range(self.n_init):
            resp = _kmeans_responsibilities(self._kmeans_data(x), self.n_components, self.seed + restart)
            params = self._m_step(x, resp + self._init_eps)
            bound, converged, n_iter = -np.inf, False, 0
            for n_iter in range(1, self.max_iter + 1):  # noqa: B007  (n_iter is reported)
                prev = bound
                norm, log_resp = self._log_resp(x, *params)
                bound = float(norm.mean())
                params = self._m_step(x, np.exp(log_resp))
                if abs(bound - prev) < self.tol:
                    converged = True
                    break
            if np.isfinite(bound) and (best is None or bound > best[0]):
                best = (bound, tuple(p.copy() for p in params), converged, n_iter)
        return best

    def predict(self, values) -> np.ndarray:
        """Most probable component (argmax responsibility) of each input, as int64 [N]."""
        return self.predict_proba(values).argmax(axis=1).astype(np.int64)


class BetaMixture(_EMMixture):
    """Mixture of K Beta distributions over DaWin coefficients lambda in [0, 1].

    Fitting, per restart r in ``range(n_init)``: k-means (``random_state = seed + r``) gives hard initial
    responsibilities (plus a tiny epsilon); then EM for at most ``max_iter`` iterations until the mean
    log-likelihood changes by less than ``tol``. The M-step matches moments: for each component the
    responsibility-weighted mean m and variance v, v capped at m(1-m)/4 (plus epsilon), s = m(1-m)/v - 1,
    a = s*m, b = s*(1-m). The restart with the highest mean log-likelihood is kept.

    Given the same data and seed this gives the same assignments as ``BetaMixtureModel`` in the public
    DaWin code. Unlike that code, lambda of exactly 0 or 1 is clipped to ``[clip_eps, 1 - clip_eps]``
    before any logarithm, so it never produces ``log(0)``.

    Attributes (after :meth:`fit`): ``weights_`` [K], ``alphas_`` [K], ``betas_`` [K], ``means_`` [K]
    (= a / (a + b), each cluster's interpolation coefficient), ``lower_bound_`` (best mean
    log-likelihood), ``converged_``, ``n_iter_``.
    """

    _name = "BetaMixture"
    _init_eps = _TINY

    def __init__(
        self,
        n_components: int = 3,
        seed: int = 1,
        n_init: int = 3,
        max_iter: int = 1000,
        tol: float = 1e-4,
        clip_eps: float = 1e-6,
    ) -> None:
        super().__init__(n_components, seed, n_init, max_iter, tol, clip_eps)
        if not 0.0 < clip_eps < 0.5:
            raise ValueError(f"BetaMixture: clip_eps must be in (0, 0.5), got {clip_eps}")

    # ---------------------------------------------------------------- internals
    def _prepare(self, values) -> np.ndarray:
        x = _as_1d_unit_interval(values, "BetaMixture")
        return np.clip(x, self.clip_eps, 1.0 - self.clip_eps)

    def _kmeans_data(self, x: np.ndarray) -> np.ndarray:
        return x[:, None]

    def _m_step(self, x: np.ndarray, resp: np.ndarray):
        """Moment matching: (weights, a, b)."""
        counts = resp.sum(axis=0) + _TINY
        weights = counts / counts.sum()
        # An empty component (all responsibilities underflowed to 0) would get mean 0 and invalid
        # parameters; keeping the mean inside the data's clipped range and the variance >= 0 changes
        # nothing for a populated component.
        mean = np.clip((resp.T @ x) / counts, self.clip_eps, 1.0 - self.clip_eps)
        var = np.maximum((resp.T @ (x * x)) / counts - mean**2, 0.0)
        var = np.minimum(var, mean * (1.0 - mean) / 4.0) + _TINY
        scale = mean * (1.0 - mean) / (var + 1e-10) - 1.0
        return weights, scale * mean, scale * (1.0 - mean)

    @staticmethod
    def _log_resp(x: np.ndarray, weights: np.ndarray, a: np.ndarray, b: np.ndarray):
        weighted = beta_dist.logpdf(x[:, None], a[None, :], b[None, :]) + np.log(weights)[None, :]
        norm = logsumexp(weighted, axis=1)
        with np.errstate(under="ignore"):
            return norm, weighted - norm[:, None]

    # ---------------------------------------------------------------- public API
    def fit(self, values) -> BetaMixture:
        """Fits the mixture to coefficients ``values`` (1-D or [N, 1], each in [0, 1])."""
        best = self._run_em(self._prepare(values))
        if best is None:
            raise RuntimeError(
                "BetaMixture: every restart ended with a non-finite log-likelihood; the coefficients are "
                "too concentrated for this many components"
            )
        self.lower_bound_, (self.weights_, self.alphas_, self.betas_), self.converged_, self.n_iter_ = best
        self.means_ = self.alphas_ / (self.alphas_ + self.betas_)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise RuntimeError("BetaMixture: call fit() before predict()")

    def predict_proba(self, values) -> np.ndarray:
        """Posterior membership probabilities [N, K] of each coefficient."""
        self._check_fitted()
        _, log_resp = self._log_resp(self._prepare(values), self.weights_, self.alphas_, self.betas_)
        return np.exp(log_resp)


class DirichletMixture(_EMMixture):
    """Simplified Dirichlet mixture over per-sample coefficient vectors pi (rows on the simplex).

    Mirrors the public DaWin multi-task code's ``DirichletMixtureModel``: k-means initialisation per restart
    (``random_state = seed + restart``), responsibilities plus 1e-14, and a heuristic M-step in which each
    component's Dirichlet parameter is the responsibility-weighted mean of pi (so it sums to one). The
    E-step uses the exact Dirichlet log-density. ``params_[k]`` is therefore cluster k's mean coefficient
    vector, which DaWin multi-task uses for the cluster's merge.

    Deliberate differences from that code: the number of clusters is ``n_components`` (the reference
    silently uses the data dimension instead), prediction uses the best restart's parameters (the
    reference keeps the last restart's), and entries of exactly 0 are clipped to ``clip_eps``.
    """

    _name = "DirichletMixture"
    _init_eps = 1e-14

    def __init__(
        self,
        n_components: int = 1,
        seed: int = 0,
        n_init: int = 5,
        max_iter: int = 500,
        tol: float = 1e-5,
        clip_eps: float = 1e-12,
    ) -> None:
        super().__init__(n_components, seed, n_init, max_iter, tol, clip_eps)

    def _prepare(self, values) -> np.ndarray:
        x = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] < 1:
            raise ValueError(f"DirichletMixture: expected a non-empty [N, D] array of simplex rows, got {x.shape}")
        bad = np.argwhere(~np.isfinite(x))
        if bad.size:
            raise ValueError(f"DirichletMixture: sample {bad[0][0]} has non-finite entry {x[tuple(bad[0])]}")
        neg = np.argwhere(x < 0)
        if neg.size:
            raise ValueError(f"DirichletMixture: sample {neg[0][0]} has negative entry {x[tuple(neg[0])]}")
        sums = x.sum(axis=1)
        off = np.flatnonzero(np.abs(sums - 1.0) > 1e-4)
        if off.size:
            raise ValueError(f"DirichletMixture: sample {off[0]} sums to {sums[off[0]]}, not 1")
        return np.maximum(x, self.clip_eps)

    @staticmethod
    def _log_resp(x: np.ndarray, weights: np.ndarray, params: np.ndarray):
        log_norm_const = gammaln(params.sum(axis=1)) - gammaln(params).sum(axis=1)  # [K]
        weighted = log_norm_const[None, :] + np.log(x) @ (params - 1.0).T + np.log(weights)[None, :]
        norm = logsumexp(weighted, axis=1)
        with np.errstate(under="ignore"):
            return norm, weighted - norm[:, None]

    def _m_step(self, x: np.ndarray, resp: np.ndarray):
        counts = resp.sum(axis=0) + 1e-14
        # Floor: an empty component would get parameters of 0 and gammaln(0) = inf.
        return counts / counts.sum(), np.maximum((resp.T @ x) / counts[:, None], self.clip_eps)

    def fit(self, values) -> DirichletMixture:
        """Fits the mixture to coefficient vectors ``values`` [N, D] (rows summing to 1)."""
        best = self._run_em(self._prepare(values))
        if best is None:
            raise RuntimeError("DirichletMixture: every restart ended with a non-finite log-likelihood")
        self.lower_bound_, (self.weights_, self.params_), self.converged_, _ = best
        return self

    def predict_proba(self, values) -> np.ndarray:
        """Posterior membership probabilities [N, K]."""
        if not hasattr(self, "params_"):
            raise RuntimeError("DirichletMixture: call fit() before predict()")
        _, log_resp = self._log_resp(self._prepare(values), self.weights_, self.params_)
        return np.exp(log_resp)
