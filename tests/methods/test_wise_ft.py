"""WiSE-FT (plain and Fisher-weighted), the alpha sweep, the output ensemble and the diagonal Fisher."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dawin_ext.methods.blended import BlendedModels
from dawin_ext.methods.inference import evaluate_accuracy
from dawin_ext.methods.wise_ft import diagonal_fisher, output_ensemble, wise_ft, wise_ft_sweep
from dawin_ext.ops.statedict import IncompatibleStateDictsError
from dawin_ext.testing.reference_methods import wise_ft_reference


def _mlp(seed: int, n_in: int = 6, n_out: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, n_out))


def _pair(seed: int):
    m0, m1 = _mlp(seed), _mlp(seed + 100)
    return m0, {k: v.clone() for k, v in m0.state_dict().items()}, {k: v.clone() for k, v in m1.state_dict().items()}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0, 1.2])
def test_wise_ft_plain_matches_reference(alpha: float) -> None:
    model, sd0, sd1 = _pair(0)
    before = copy.deepcopy((sd0, sd1))
    merged = wise_ft(sd0, sd1, alpha)
    ref = wise_ft_reference(alpha, sd0, sd1)
    assert merged.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], rtol=1e-6, atol=1e-6)
    for a, b in zip(before, (sd0, sd1), strict=True):  # inputs untouched
        for k in a:
            assert torch.equal(a[k], b[k])
    # Modules are accepted too.
    m1 = _mlp(100)
    for k, v in wise_ft(model, m1, alpha).items():
        torch.testing.assert_close(v, wise_ft_reference(alpha, model.state_dict(), m1.state_dict())[k])


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.7, 1.0])
def test_wise_ft_fisher_matches_reference(alpha: float) -> None:
    _, sd0, sd1 = _pair(1)
    g = torch.Generator().manual_seed(5)
    keys = [k for k in sd0 if k.endswith("weight")]  # biases have no Fisher: weight 1
    f0 = {k: torch.rand(sd0[k].shape, generator=g) ** 4 for k in keys}
    f1 = {k: torch.rand(sd0[k].shape, generator=g) ** 4 for k in keys}
    f0[keys[0]][0, 0] = 0.0  # exercises the floor
    merged = wise_ft(sd0, sd1, alpha, fishers=(f0, f1))
    ref = wise_ft_reference(alpha, sd0, sd1, fishers=(f0, f1))
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], rtol=1e-5, atol=1e-6)


def test_wise_ft_validation() -> None:
    _, sd0, sd1 = _pair(2)
    bad = dict(sd1)
    bad["3.weight"] = torch.zeros(4, 16)
    with pytest.raises(IncompatibleStateDictsError, match="3.weight"):
        wise_ft(sd0, bad, 0.5)
    missing = {k: v for k, v in sd1.items() if k != "1.bias"}
    with pytest.raises(IncompatibleStateDictsError, match="1.bias"):
        wise_ft(sd0, missing, 0.5)
    f = {"0.weight": torch.ones_like(sd0["0.weight"])}
    with pytest.raises(ValueError, match="only in fishers"):
        wise_ft(sd0, sd1, 0.5, fishers=(f, {}))
    with pytest.raises(ValueError, match=r"alpha in \[0, 1\]"):
        wise_ft(sd0, sd1, 1.5, fishers=(f, f))
    with pytest.raises(ValueError, match="finite"):
        wise_ft(sd0, sd1, float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        wise_ft(sd0, sd1, 0.5, fishers=({"0.weight": torch.full_like(sd0["0.weight"], float("nan"))}, f))


@pytest.mark.parametrize("arch", ["dawin-tiny-vit", "dawin-tiny-rn"])
def test_wise_ft_sweep_on_open_clip_matches_reference_merges(arch: str, tiny_clip) -> None:
    clf, zs, ft, _ = tiny_clip(arch, 3, 0.2)
    x = torch.randn(12, 3, 32, 32)
    alphas = [0.0, 0.4, 1.0]
    results = wise_ft_sweep(clf, zs, ft, alphas, evaluate=lambda m: m(x))
    ref_model = copy.deepcopy(clf).eval()
    for a, logits in results:
        merged = wise_ft_reference(a, zs, ft)
        # the reference's arithmetic turns integer buffers into floats; load_state_dict casts them back
        ref_model.load_state_dict(merged)
        with torch.no_grad():
            expected = ref_model(x)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(logits.argmax(1), expected.argmax(1))
    # The caller's module is not modified by the sweep.
    for k, v in clf.state_dict().items():
        assert torch.equal(v, zs[k])


def test_wise_ft_sweep_fisher_and_accuracy() -> None:
    model, sd0, sd1 = _pair(4)
    f = {k: torch.rand_like(v) for k, v in sd0.items() if k.endswith("weight")}
    x, y = torch.randn(20, 6), torch.randint(0, 5, (20,))
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    res = wise_ft_sweep(model, sd0, sd1, [0.2, 0.9], lambda m: evaluate_accuracy(m, loader), fishers=(f, f))
    for a, acc in res:
        m = copy.deepcopy(model)
        m.load_state_dict(wise_ft_reference(a, sd0, sd1, fishers=(f, f)))
        with torch.no_grad():
            assert acc == pytest.approx((m(x).argmax(1) == y).float().mean().item())


def test_output_ensemble() -> None:
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    w = torch.rand(7, generator=g)
    out = output_ensemble(z0, z1, w, temperatures=(0.9, 1.1))
    expected = (1 - w[:, None]) * F.softmax(z0 / 0.9, 1) + w[:, None] * F.softmax(z1 / 1.1, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(output_ensemble(z0, z1, 0.5), (F.softmax(z0, 1) + F.softmax(z1, 1)) / 2)
    with pytest.raises(ValueError, match="temperatures"):
        output_ensemble(z0, z1, 0.5, temperatures=(0.0, 1.0))


def test_diagonal_fisher_matches_analytic_fisher_of_softmax_regression() -> None:
    # For logits = W x, the per-sample gradient of CE(y) w.r.t. W is (p - e_y) x^T, so the exact Fisher
    # is E_y~p[(p - e_y)^2] x^2. The estimator samples y, so it converges to that at rate 1/sqrt(n).
    torch.manual_seed(0)
    lin = nn.Linear(3, 4, bias=False)
    x = torch.randn(1, 3)
    n = 3000
    fisher = diagonal_fisher(lin, [x.expand(n, 3)], seed=1)
    with torch.no_grad():
        p = F.softmax(lin(x), dim=1)[0]
    eye = torch.eye(4)
    exact = sum(p[y] * ((p - eye[y]) ** 2)[:, None] * x[0][None, :] ** 2 for y in range(4))
    torch.testing.assert_close(fisher["weight"], exact, rtol=0.15, atol=1e-4)
    assert lin.weight.grad is None
    with pytest.raises(ValueError, match="no samples"):
        diagonal_fisher(lin, [])


def test_blended_models_reuse_buffers() -> None:
    model, sd0, sd1 = _pair(6)
    holder = BlendedModels(model, [sd0, sd1], n_models=2)
    ptrs = [p.data_ptr() for p in holder.models[0].parameters()]
    for a in (0.1, 0.8):
        holder.blend([[1 - a, a], [a, 1 - a]])
        assert [p.data_ptr() for p in holder.models[0].parameters()] == ptrs
        for k, v in holder.models[1].state_dict().items():
            torch.testing.assert_close(v, wise_ft_reference(1 - a, sd0, sd1)[k])
    with pytest.raises(ValueError, match="coefficient rows"):
        holder.blend([[0.5, 0.5]])
