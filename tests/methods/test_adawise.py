"""AdaWiSE: per-batch Bayesian optimisation of alpha, against a plain mirror with full merges."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_clip_pair, tiny_mlp

from dawin_ext.methods.adawise import AdaWiSE, expected_improvement
from dawin_ext.ops.statedict import IncompatibleStateDictsError
from dawin_ext.testing.reference_methods import adawise_reference
from dawin_ext.testing.reference_ops import entropy_reference, interpolation_reference


def _setup(seed: int = 0):
    model = tiny_mlp(seed)
    zs = {k: v.clone() for k, v in model.state_dict().items()}
    ft = {k: v.clone() * 1.5 for k, v in tiny_mlp(seed + 1).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 2)
    batches = [torch.randn(16, 8, generator=g) * (1 + i) for i in range(3)]
    return model, zs, ft, batches


@pytest.mark.parametrize("warm_start", [True, False])
def test_adawise_matches_plain_mirror(warm_start: bool) -> None:
    model, zs, ft, batches = _setup(0)
    ada = AdaWiSE(model, zs, ft, n_evals=6, n_init=3, warm_start=warm_start, seed=0)
    ours = [ada.predict(x) for x in batches]
    alphas, ref_logits = adawise_reference(model, zs, ft, batches, n_evals=6, n_init=3, warm_start=warm_start, seed=0)
    assert [h["alpha"] for h in ada.history_] == pytest.approx(alphas, abs=1e-12)
    for a, b in zip(ours, ref_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.argmax(1), b.argmax(1))
    for h in ada.history_:
        assert len(h["alphas"]) == 6 and len(set(h["alphas"])) == 6
        assert all(0.0 <= a <= 1.0 for a in h["alphas"])
        assert h["alpha"] == h["alphas"][int(np.argmin(h["objectives"]))]
    if warm_start:  # every later batch starts from the previous batch's choice
        for prev, cur in zip(ada.history_, ada.history_[1:], strict=False):
            assert cur["alphas"][0] == prev["alpha"]
    else:
        assert all(h["alphas"][:3] == [0.0, 0.5, 1.0] for h in ada.history_)


def test_adawise_objective_is_mean_entropy_of_the_merged_model() -> None:
    model, zs, ft, batches = _setup(1)
    ada = AdaWiSE(model, zs, ft, n_evals=4, n_init=2)
    out = ada.predict(batches[0])
    m = copy.deepcopy(model)
    h = ada.history_[0]
    for a, obj in zip(h["alphas"], h["objectives"], strict=True):
        m.load_state_dict(interpolation_reference(a, zs, ft))
        with torch.no_grad():
            z = m(batches[0])
        assert obj == pytest.approx(float(entropy_reference(z).mean()), abs=1e-5)
        if a == h["alpha"]:
            torch.testing.assert_close(out, z, rtol=1e-5, atol=1e-5)
    # The caller's model is untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, zs[k])


@pytest.mark.parametrize("q", [2, 3])
def test_adawise_candidates_in_one_pass(q: int) -> None:
    # Several alphas scored in one exact per-sample pass: every objective is the mean entropy of the merged
    # model at that alpha, the returned logits are the chosen alpha's, and the budget is respected.
    model, zs, ft, batches = _setup(2)
    ada = AdaWiSE(model, zs, ft, n_evals=7, n_init=3, candidates_per_pass=q, seed=0)
    m = copy.deepcopy(model)
    for x in batches[:2]:
        out = ada.predict(x)
        h = ada.history_[-1]
        assert len(h["alphas"]) == 7 and len(set(h["alphas"])) == 7
        assert h["alpha"] == h["alphas"][int(np.argmin(h["objectives"]))]
        for a, obj in zip(h["alphas"], h["objectives"], strict=True):
            m.load_state_dict(interpolation_reference(a, zs, ft))
            with torch.no_grad():
                z = m(x)
            assert obj == pytest.approx(float(entropy_reference(z).mean()), abs=1e-5)
            if a == h["alpha"]:
                torch.testing.assert_close(out, z, rtol=1e-4, atol=1e-4)
    assert ada._exact is not None  # the one-pass path really ran


def test_adawise_on_tiny_open_clip() -> None:
    clf, zs, ft, g = tiny_clip_pair(["a", "b", "c", "d", "e"], seed=4, noise_seed=5, noise=0.3)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    ada = AdaWiSE(clf, zs, ft, n_evals=5, n_init=3, seed=3)
    ours = ada.predict_dataset(batches)
    alphas, ref = adawise_reference(clf, zs, ft, batches, n_evals=5, n_init=3, seed=3)
    assert [h["alpha"] for h in ada.history_] == pytest.approx(alphas, abs=1e-12)
    torch.testing.assert_close(ours, torch.cat(ref), rtol=1e-4, atol=1e-4)


def test_expected_improvement() -> None:
    mu = np.array([0.0, 1.0, 2.0])
    sd = np.array([1.0, 0.0, 0.5])
    ei = expected_improvement(mu, sd, best=1.0, xi=0.0)
    # Closed form at mu=0, sd=1, best=1: 1*Phi(1) + phi(1).
    from scipy.stats import norm

    assert ei[0] == pytest.approx(norm.cdf(1.0) + norm.pdf(1.0))
    assert ei[1] == 0.0 and 0 < ei[2] < ei[0]


def test_adawise_validation() -> None:
    model, zs, ft, batches = _setup(2)
    with pytest.raises(ValueError, match="n_init"):
        AdaWiSE(model, zs, ft, n_init=0)
    with pytest.raises(ValueError, match="n_evals"):
        AdaWiSE(model, zs, ft, n_evals=2, n_init=3)
    with pytest.raises(ValueError, match="candidates_per_pass"):
        AdaWiSE(model, zs, ft, candidates_per_pass=0)
    bad = dict(ft)
    del bad["1.weight"]
    with pytest.raises(IncompatibleStateDictsError, match="1.weight"):
        AdaWiSE(model, zs, bad)
    with pytest.raises(ValueError, match="empty batch"):
        AdaWiSE(model, zs, ft).predict(torch.empty(0, 8))
    x = batches[0].clone()
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="sample 3"):
        AdaWiSE(model, zs, ft).predict(x)
    with pytest.raises(ValueError, match="no batches"):
        AdaWiSE(model, zs, ft).predict_dataset([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adawise_on_cuda_matches_cpu() -> None:
    model, zs, ft, batches = _setup(3)
    cpu = AdaWiSE(model, zs, ft, n_evals=5)
    gpu = AdaWiSE(
        copy.deepcopy(model).cuda(),
        {k: v.cuda() for k, v in zs.items()},
        {k: v.cuda() for k, v in ft.items()},
        n_evals=5,
    )
    for x in batches:
        torch.testing.assert_close(gpu.predict(x).cpu(), cpu.predict(x), rtol=1e-4, atol=1e-4)
    assert [h["alpha"] for h in gpu.history_] == pytest.approx([h["alpha"] for h in cpu.history_], abs=1e-12)
