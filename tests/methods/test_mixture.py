"""BetaMixture / DirichletMixture against plain mirrors of the reference EM procedures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dawin_ext import entropy_coefficients
from dawin_ext.methods.mixture import BetaMixture, DirichletMixture
from dawin_ext.testing.reference_methods import beta_mixture_reference, dirichlet_mixture_reference


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Cluster indices are arbitrary; two labelings agree when they are a relabeling of each other."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _lambda_data(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = rng.integers(200, 600)
    parts = [rng.beta(rng.uniform(1, 9), rng.uniform(1, 9), size=n // 3 + i) for i in range(3)]
    return np.concatenate(parts)


def _dawin_lambdas(seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 700, 10, generator=g) * torch.rand(2, 700, 1, generator=g) * 4
    return entropy_coefficients(logits, [0.9576, 0.9733]).coefficients[:, 1].double().numpy()


@pytest.mark.parametrize("seed", [1, 2, 7])
@pytest.mark.parametrize("source", ["beta", "dawin"])
def test_beta_mixture_matches_reference(seed: int, source: str) -> None:
    lam = _lambda_data(seed) if source == "beta" else _dawin_lambdas(seed)
    ours = BetaMixture(n_components=3, seed=seed).fit(lam)
    ref = beta_mixture_reference(lam, n_mixtures=3, seed=seed)
    labels = ours.predict(lam)
    assert _same_partition(labels, ref["labels"])
    # Every sample gets the same interpolation coefficient (the cluster's Beta mean).
    np.testing.assert_allclose(ours.means_[labels], ref["means"][ref["labels"]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.sort(ours.means_), np.sort(ref["means"]), atol=1e-6)
    assert ours.lower_bound_ == pytest.approx(ref["lower_bound"], abs=1e-9)
    np.testing.assert_allclose(ours.means_, ours.alphas_ / (ours.alphas_ + ours.betas_))
    proba = ours.predict_proba(lam)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert (proba.argmax(axis=1) == labels).all()


def test_beta_mixture_accepts_exact_zero_and_one() -> None:
    lam = np.concatenate([_lambda_data(3), [0.0, 1.0, 0.0, 1.0]])
    # The reference takes log(0) here: no restart gets a finite likelihood and it has nothing to return.
    with np.errstate(all="ignore"), pytest.raises(TypeError):
        beta_mixture_reference(lam, 3, 1)
    ours = BetaMixture(3, seed=1).fit(lam)
    assert np.isfinite(ours.lower_bound_)
    assert np.isfinite(ours.means_).all() and ((ours.means_ > 0) & (ours.means_ < 1)).all()
    proba = ours.predict_proba(np.array([0.0, 1.0]))
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    # Clipping only touches the extremes: on the rest the fit matches a fit on clipped data.
    clipped = BetaMixture(3, seed=1).fit(np.clip(lam, 1e-6, 1 - 1e-6))
    np.testing.assert_allclose(clipped.means_, ours.means_)


def test_beta_mixture_accepts_torch_and_column_input() -> None:
    lam = _lambda_data(4)
    a = BetaMixture(3, seed=1).fit(lam)
    b = BetaMixture(3, seed=1).fit(torch.from_numpy(lam).float().reshape(-1, 1))
    assert _same_partition(a.predict(lam), b.predict(lam.astype(np.float32)))


@pytest.mark.parametrize(
    ("values", "k", "match"),
    [
        (np.array([0.2, 0.3]), 3, "more than the 2 samples"),
        (np.array([0.2, np.nan, 0.4]), 1, "sample 1"),
        (np.array([0.2, 1.5, 0.4]), 1, "sample 1 is 1.5"),
        (np.array([]), 1, "no samples"),
        (np.zeros((3, 2)), 1, "1-D"),
    ],
)
def test_beta_mixture_validation(values, k, match) -> None:
    with pytest.raises(ValueError, match=match):
        BetaMixture(n_components=k).fit(values)


def test_beta_mixture_with_fewer_distinct_values_than_components() -> None:
    # Identical models give lambda = 1/2 everywhere: the extra components stay empty but valid.
    bm = BetaMixture(3, seed=1).fit(np.full(20, 0.5))
    assert np.isfinite(bm.means_).all() and (bm.alphas_ > 0).all() and (bm.betas_ > 0).all()
    np.testing.assert_allclose(bm.means_[bm.predict(np.full(3, 0.5))], 0.5, atol=1e-6)


def test_beta_mixture_component_count_validation() -> None:
    with pytest.raises(ValueError, match="n_components"):
        BetaMixture(n_components=0)
    with pytest.raises(RuntimeError, match="fit"):
        BetaMixture().predict([0.5])


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dirichlet_mixture_matches_reference(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed + 10 * k)
    pi = np.concatenate([rng.dirichlet(rng.uniform(0.5, 6, size=4), size=150) for _ in range(3)])
    ours = DirichletMixture(n_components=k, seed=seed).fit(pi)
    ref = dirichlet_mixture_reference(pi, n_clusters=k, seed=seed)
    labels = ours.predict(pi)
    assert _same_partition(labels, ref["labels"])
    np.testing.assert_allclose(ours.params_[labels], ref["params"][ref["labels"]], atol=1e-6)
    np.testing.assert_allclose(ours.params_.sum(axis=1), 1.0, atol=1e-9)  # weighted means of simplex rows


def test_dirichlet_mixture_validation() -> None:
    with pytest.raises(ValueError, match="sums to"):
        DirichletMixture(1).fit(np.array([[0.5, 0.6], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="negative"):
        DirichletMixture(1).fit(np.array([[1.5, -0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="more than"):
        DirichletMixture(3).fit(np.array([[0.4, 0.6], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="n_components"):
        DirichletMixture(0)
    # Exact zeros (a task with no weight) are clipped, not log(0).
    pi = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.9, 0.1]])
    assert np.isfinite(DirichletMixture(2).fit(pi).lower_bound_)
