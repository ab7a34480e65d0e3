"""DaWin: coefficients, mixture assignments and cluster-wise predictions against the plain reference mirrors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import mlp_pair

from dawin_ext.methods.dawin import DaWin, dawin_coefficients
from dawin_ext.methods.inference import collect_logits
from dawin_ext.ops.statedict import IncompatibleStateDictsError
from dawin_ext.testing.reference_methods import (
    beta_mixture_reference,
    dawin_cluster_loop_reference,
    dawin_coefficients_reference,
)
from dawin_ext.testing.reference_ops import interpolation_reference

TEMPS = (0.9576, 0.9733)


def _batches(x: torch.Tensor, y: torch.Tensor | None, bs: int):
    if y is None:
        return [x[i : i + bs] for i in range(0, x.shape[0], bs)]
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, x.shape[0], bs)]


def _tiny_clip(factory, arch: str, seed: int):
    clf, zs, ft, g = factory(arch, seed, 0.3)
    x = torch.randn(40, 3, 32, 32, generator=g) * torch.rand(40, 1, 1, 1, generator=g).mul(3)
    return clf, zs, ft, x


def _same_partition(a, b) -> bool:
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist(), strict=True))
    return len(pairs) == len(set(np.asarray(a).tolist())) == len(set(np.asarray(b).tolist()))


# --------------------------------------------------------------------------------------------- coefficients
CASES = [
    ("entropy", False, "ensemble_soft"),
    ("entropy", True, "ensemble_soft"),
    ("output_ensemble", True, "ensemble_soft"),
    ("selective", False, "ensemble_soft"),
    ("max_logit", False, "ensemble_soft"),
    *[("cross_entropy", off, p) for off in (False, True) for p in ("ensemble_soft", "ensemble_hard", "true")],
    *[("cross_entropy", False, p) for p in ("merged_soft", "merged_hard")],
]


@pytest.mark.parametrize(("expertise", "offset", "pseudo"), CASES)
def test_coefficients_match_reference(expertise: str, offset: bool, pseudo: str) -> None:
    g = torch.Generator().manual_seed(hash((expertise, offset, pseudo)) % 1000)
    zs = torch.randn(300, 11, generator=g) * torch.rand(300, 1, generator=g) * 5
    ft = torch.randn(300, 11, generator=g) * torch.rand(300, 1, generator=g) * 5
    if expertise == "max_logit":
        zs, ft = zs.abs() + 0.1, ft.abs() + 0.1
    merged = torch.randn(300, 11, generator=g)
    labels = torch.randint(0, 11, (300,), generator=g)
    settings = dict(expertise=expertise, temperatures=TEMPS, pseudo_label=pseudo, merged_logits=merged, labels=labels)
    lam, used = dawin_coefficients(zs, ft, offset=offset, **settings)
    ref = dawin_coefficients_reference(
        zs.double(), ft.double(), expertise, TEMPS, offset, pseudo, merged.double(), labels
    )
    torch.testing.assert_close(lam.double(), ref.double(), rtol=0, atol=1e-6)
    assert (used is not None) == offset
    if offset:
        # Streaming: the stored offset statistics reproduce the same lambdas.
        again, _ = dawin_coefficients(zs, ft, offset=used, **settings)
        torch.testing.assert_close(again, lam, rtol=0, atol=1e-6)


def test_coefficient_validation() -> None:
    zs, ft = torch.randn(5, 3), torch.randn(5, 3)
    zs[3, 1] = float("nan")
    with pytest.raises(ValueError, match="sample 3"):
        dawin_coefficients(zs, ft)
    with pytest.raises(ValueError, match="temperatures"):
        dawin_coefficients(ft, ft, temperatures=(1.0, 0.0))
    with pytest.raises(ValueError, match="same number of classes"):
        dawin_coefficients(torch.randn(5, 3), torch.randn(5, 4))
    neg = -torch.rand(5, 3) - 0.1
    with pytest.raises(ValueError, match="max-logit ratio of sample 0"):
        dawin_coefficients(neg, ft.abs(), expertise="max_logit")


# --------------------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("expertise", ["entropy", "cross_entropy", "max_logit"])
def test_dawin_cluster_pipeline_matches_reference_loop(expertise: str) -> None:
    model, zs, ft, x, y = mlp_pair(0)
    if expertise == "max_logit":  # needs positive max logits: shift the last layer's bias
        for sd in (zs, ft):
            sd["3.bias"] = sd["3.bias"] + 10.0
    loader = _batches(x, y, 32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    dw = DaWin(model, zs, ft, expertise=expertise, temperatures=TEMPS, offset_adjustment=expertise != "max_logit")
    dw.fit(loader)

    # Same coefficients as the reference's datastore.
    zl, fl = [], []
    m = copy.deepcopy(model)
    with torch.no_grad():
        for sd, out in ((zs, zl), (ft, fl)):
            m.load_state_dict(sd)
            out.append(m(x))
    ref_lam = dawin_coefficients_reference(
        zl[0], fl[0], expertise, TEMPS, expertise != "max_logit", "ensemble_soft", labels=y
    )
    torch.testing.assert_close(dw.coefficients_, ref_lam.float(), rtol=0, atol=1e-6)

    # Same mixture assignments.
    ref_bmm = beta_mixture_reference(ref_lam.double().numpy(), 3, 1)
    assert _same_partition(dw.labels_.numpy(), ref_bmm["labels"])
    np.testing.assert_allclose(
        dw.cluster_coefficients_.numpy()[dw.labels_.numpy()], ref_bmm["means"][ref_bmm["labels"]], atol=1e-6
    )

    # Same predictions as re-merging per cluster per batch.
    ours = dw.predict_dataset(loader)
    ref = dawin_cluster_loop_reference(model, zs, ft, [b[0] for b in loader], ref_bmm["labels"], ref_bmm["means"])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.argmax(1), ref.argmax(1))

    # Streaming on the same data (no refit) gives the same thing batch by batch.
    for i, (xb, yb) in enumerate(loader):
        torch.testing.assert_close(dw.predict(xb, y=yb), ours[32 * i : 32 * i + xb.shape[0]], rtol=1e-5, atol=1e-5)
    # The caller's module and state dicts are untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k])


@pytest.mark.parametrize("arch", ["dawin-tiny-vit", "dawin-tiny-rn"])
def test_dawin_on_open_clip_matches_reference_loop(arch: str, tiny_clip) -> None:
    clf, zs, ft, x = _tiny_clip(tiny_clip, arch, 7)
    loader = _batches(x, None, 16)  # loaders may yield bare inputs
    dw = DaWin(clf, zs, ft, temperatures=TEMPS, offset_adjustment=True, n_clusters=3, seed=1).fit(loader)
    ref_model = copy.deepcopy(clf).eval()
    with torch.no_grad():
        ref_model.load_state_dict(zs)
        zl = ref_model(x)
        ref_model.load_state_dict(ft)
        fl = ref_model(x)
    ref_lam = dawin_coefficients_reference(zl, fl, "entropy", TEMPS, True)
    torch.testing.assert_close(dw.coefficients_, ref_lam, rtol=0, atol=1e-6)
    ref_bmm = beta_mixture_reference(ref_lam.double().numpy(), 3, 1)
    assert _same_partition(dw.labels_.numpy(), ref_bmm["labels"])
    ours = dw.predict_dataset(loader)
    ref = dawin_cluster_loop_reference(clf, zs, ft, loader, ref_bmm["labels"], ref_bmm["means"])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    torch.testing.assert_close(dw.predict(x[:16]), ours[:16], rtol=1e-4, atol=1e-4)


def test_output_space_modes_match_reference() -> None:
    model, zs, ft, x, y = mlp_pair(3)
    loader = _batches(x, y, 50)
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.load_state_dict(zs)
        zl = m(x)
        m.load_state_dict(ft)
        fl = m(x)
    sel = DaWin(model, zs, ft, expertise="selective", temperatures=TEMPS).fit(loader)
    coef = dawin_coefficients_reference(zl, fl, "selective", TEMPS)
    expected = torch.where(coef.bool()[:, None], fl, zl)
    torch.testing.assert_close(sel.predict_dataset(loader), expected)
    torch.testing.assert_close(sel.predict(x[:50]), expected[:50])

    ens = DaWin(model, zs, ft, expertise="output_ensemble", temperatures=TEMPS).fit(loader)
    lam = dawin_coefficients_reference(zl, fl, "entropy", TEMPS)[:, None]
    expected = (1 - lam) * F.softmax(zl / TEMPS[0], 1) + lam * F.softmax(fl / TEMPS[1], 1)
    torch.testing.assert_close(ens.predict_dataset(loader), expected, rtol=1e-6, atol=1e-6)


def test_dawin_streaming_uses_calibration_statistics() -> None:
    model, zs, ft, x, y = mlp_pair(5)
    dw = DaWin(model, zs, ft, offset_adjustment=True).fit(_batches(x[:80], None, 40))
    lam = dw.coefficients(x[80:])
    b, w = dw.offset_
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.load_state_dict(zs)
        h0 = -(F.softmax(m(x[80:]), 1) * F.log_softmax(m(x[80:]), 1)).sum(1)
        m.load_state_dict(ft)
        h1 = -(F.softmax(m(x[80:]), 1) * F.log_softmax(m(x[80:]), 1)).sum(1)
    expected = ((-h1).exp() + b / w) / ((-h0).exp() + (-h1).exp() + b)
    torch.testing.assert_close(lam, expected, rtol=0, atol=1e-6)
    out = dw.predict(x[80:])
    assign = dw.assign(lam)
    for k in torch.unique(assign).tolist():
        idx = assign == k
        a = float(dw.cluster_coefficients_[k])
        m.load_state_dict(interpolation_reference(a, zs, ft))
        with torch.no_grad():
            torch.testing.assert_close(out[idx], m(x[80:][idx]), rtol=1e-5, atol=1e-5)


def test_dawin_validation() -> None:
    model, zs, ft, x, y = mlp_pair(6)
    bad = dict(ft)
    bad["3.weight"] = torch.zeros(7, 32)
    with pytest.raises(IncompatibleStateDictsError, match="3.weight"):
        DaWin(model, zs, bad)
    with pytest.raises(ValueError, match="temperatures"):
        DaWin(model, zs, ft, temperatures=(1.0, -1.0))
    with pytest.raises(ValueError, match="n_clusters"):
        DaWin(model, zs, ft, n_clusters=0)
    with pytest.raises(ValueError, match="more than the 5 samples"):
        DaWin(model, zs, ft, n_clusters=6).fit([x[:5]])
    with pytest.raises(ValueError, match="no samples"):
        DaWin(model, zs, ft).fit([])
    with pytest.raises(ValueError, match="expertise"):
        DaWin(model, zs, ft, expertise="oracle")
    with pytest.raises(RuntimeError, match="fit"):
        DaWin(model, zs, ft).predict(x[:3])
    xn = x.clone()
    xn[37, 0] = float("nan")
    with pytest.raises(ValueError, match="sample 37"):
        DaWin(model, zs, ft).fit(_batches(xn, None, 16))
    dw = DaWin(model, zs, ft).fit(_batches(x, None, 40))
    with pytest.raises(ValueError, match="120"):
        dw.predict_dataset(_batches(x[:100], None, 40))


def test_collect_logits_rejects_differing_class_counts() -> None:
    def model(x):
        return x[:, : x.shape[1] - 1]

    with pytest.raises(ValueError, match="batch 1 has 4 classes but earlier logits had 5"):
        collect_logits([model], [torch.randn(3, 6), torch.randn(3, 5)])
    with pytest.raises(ValueError, match="no samples"):
        collect_logits([model], [])


def test_dawin_exact_mode_matches_per_sample_merges() -> None:
    from dawin_ext import exact as samplewise

    if not hasattr(samplewise, "SampleWiseInterpolator"):
        pytest.skip("dawin_ext.exact has no SampleWiseInterpolator yet")
    model, zs, ft, x, y = mlp_pair(8)
    dw = DaWin(model, zs, ft).fit(_batches(x, None, 60))
    out = dw.predict(x[:20], mode="exact")
    lam = dw.coefficients(x[:20])
    m = copy.deepcopy(model)
    for i in range(20):
        m.load_state_dict(interpolation_reference(float(lam[i]), zs, ft))
        with torch.no_grad():
            torch.testing.assert_close(out[i], m(x[i : i + 1])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dawin_on_cuda_matches_cpu() -> None:
    model, zs, ft, x, y = mlp_pair(9)
    loader = _batches(x, y, 40)
    cpu = DaWin(model, zs, ft, offset_adjustment=True).fit(loader)

    def on_cuda(sd):
        return {k: v.cuda() for k, v in sd.items()}

    gpu = DaWin(copy.deepcopy(model).cuda(), on_cuda(zs), on_cuda(ft), offset_adjustment=True).fit(loader)
    torch.testing.assert_close(gpu.coefficients_, cpu.coefficients_, rtol=0, atol=1e-5)
    assert _same_partition(gpu.labels_.numpy(), cpu.labels_.numpy())
    torch.testing.assert_close(gpu.predict_dataset(loader).cpu(), cpu.predict_dataset(loader), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.predict(x[:40]).cpu(), cpu.predict(x[:40]), rtol=1e-4, atol=1e-4)


def test_dawin_exact_mode_on_tiny_open_clip_vit(tiny_clip) -> None:
    clf, zs, ft, x = _tiny_clip(tiny_clip, "dawin-tiny-vit", 12)
    dw = DaWin(clf, zs, ft, temperatures=TEMPS).fit([x[:20], x[20:]])
    out = dw.predict_dataset([x[:20], x[20:]], mode="exact")
    m = copy.deepcopy(clf).eval()
    with torch.no_grad():
        for i in range(0, 40, 7):
            m.load_state_dict(interpolation_reference(float(dw.coefficients_[i]), zs, ft))
            torch.testing.assert_close(out[i], m(x[i : i + 1])[0], rtol=1e-4, atol=1e-4)
