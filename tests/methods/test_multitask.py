"""DaWin multi-task: task weights, Dirichlet clusters and cluster-wise merges against plain mirrors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dawin_ext.integrations import openclip
from dawin_ext.methods.multitask import DaWinMultiTask, task_vectors_from
from dawin_ext.ops.statedict import IncompatibleStateDictsError
from dawin_ext.testing.reference_methods import (
    dirichlet_mixture_reference,
    multitask_coefficients_reference,
    multitask_merge_reference,
)


def _encoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 24), nn.LayerNorm(24), nn.GELU(), nn.Linear(24, 12))


def _setup(n_tasks: int = 3, seed: int = 0):
    base = _encoder(seed)
    theta_0 = {k: v.clone() for k, v in base.state_dict().items()}
    thetas = []
    for t in range(n_tasks):
        g = torch.Generator().manual_seed(seed + 10 + t)
        thetas.append({k: v + 0.4 * torch.randn(v.shape, generator=g) for k, v in theta_0.items()})
    torch.manual_seed(seed + 99)
    head = nn.Linear(12, 5)
    g = torch.Generator().manual_seed(seed + 5)
    x = torch.randn(90, 8, generator=g) * torch.rand(90, 1, generator=g).mul(4)
    return base, theta_0, thetas, head, x


def _same_partition(a, b) -> bool:
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist(), strict=True))
    return len(pairs) == len(set(np.asarray(a).tolist())) == len(set(np.asarray(b).tolist()))


def _reference_pi(base, theta_0, thetas, head, x):
    taus = [{k: th[k] - theta_0[k] for k in theta_0} for th in thetas]
    m = copy.deepcopy(base)
    logits = []
    with torch.no_grad():
        for tau in taus:
            m.load_state_dict({k: theta_0[k] + tau[k] for k in theta_0})
            logits.append(head(m(x)))
    return multitask_coefficients_reference(logits), taus


@pytest.mark.parametrize("n_clusters", [1, 3])
def test_multitask_matches_reference(n_clusters: int) -> None:
    base, theta_0, thetas, head, x = _setup()
    loader = [(x[i : i + 32], torch.zeros(32)) for i in range(0, 90, 32)]
    mt = DaWinMultiTask(base, theta_0, thetas, head=head, n_clusters=n_clusters, seed=0).fit(loader)
    ref_pi, taus = _reference_pi(base, theta_0, thetas, head, x)
    torch.testing.assert_close(mt.pi_.double(), ref_pi.double(), rtol=0, atol=1e-6)

    ref = dirichlet_mixture_reference(ref_pi.double().numpy(), n_clusters, seed=0)
    assert _same_partition(mt.labels_.numpy(), ref["labels"])
    np.testing.assert_allclose(mt.cluster_pi_.numpy()[mt.labels_.numpy()], ref["params"][ref["labels"]], atol=1e-6)

    # Each cluster model holds theta_0 + 0.3 * T * sum_t params_kt * tau_t.
    for k in range(n_clusters):
        merged = multitask_merge_reference(theta_0, taus, mt.cluster_pi_[k].tolist(), scale=0.3)
        for key, v in mt.clusters.models[k].state_dict().items():
            torch.testing.assert_close(v, merged[key], rtol=1e-5, atol=1e-5)

    # Predictions: every sample through its cluster's merged encoder and the (unmerged) head.
    ours = mt.predict_dataset(loader)
    m = copy.deepcopy(base)
    expected = torch.empty_like(ours)
    with torch.no_grad():
        for j in np.unique(ref["labels"]):
            idx = torch.from_numpy(ref["labels"] == j)
            m.load_state_dict(multitask_merge_reference(theta_0, taus, ref["params"][j], scale=0.3))
            expected[idx] = head(m(x[idx]))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.argmax(1), expected.argmax(1))
    # Streaming on the same samples assigns the same clusters.
    torch.testing.assert_close(mt.predict(x[:32]), ours[:32], rtol=1e-5, atol=1e-5)


def test_task_vectors_and_scale_options() -> None:
    base, theta_0, thetas, head, x = _setup(n_tasks=2, seed=3)
    taus = task_vectors_from(theta_0, thetas)
    a = DaWinMultiTask(base, theta_0, thetas, head=head).fit([x])
    b = DaWinMultiTask(base, theta_0, task_vectors=taus, head=head).fit([x])
    torch.testing.assert_close(a.predict_dataset([x]), b.predict_dataset([x]))
    c = DaWinMultiTask(base, theta_0, thetas, head=head, scale=0.5, scale_by_tasks=False).fit([x])
    assert c.multiplier == 0.5 and a.multiplier == pytest.approx(0.6)
    merged = multitask_merge_reference(theta_0, taus, (c.cluster_pi_[0] * 0.5 / 2 / 0.3).tolist(), scale=0.3)
    for key, v in c.clusters.models[0].state_dict().items():
        torch.testing.assert_close(v, merged[key], rtol=1e-5, atol=1e-5)


def test_multitask_on_open_clip_visual() -> None:
    openclip.register_tiny_configs()
    torch.manual_seed(11)
    model, _, tok = openclip.create_clip_model("dawin-tiny-vit")
    clf = openclip.CLIPClassifier.from_clip(model, tok, ["a", "b", "c", "d"], templates="classname")
    visual = clf.visual
    theta_0 = {k: v.clone() for k, v in visual.state_dict().items()}
    thetas = []
    for t in range(3):
        g = torch.Generator().manual_seed(20 + t)
        thetas.append(
            {k: v + 0.3 * v.std().nan_to_num(0.1) * torch.randn(v.shape, generator=g) for k, v in theta_0.items()}
        )

    def head(f):
        return clf.head(F.normalize(f, dim=-1))

    x = torch.randn(24, 3, 32, 32)
    mt = DaWinMultiTask(visual, theta_0, thetas, head=head, n_clusters=2).fit([x[:12], x[12:]])
    ref_pi, taus = _reference_pi(visual, theta_0, thetas, head, x)
    torch.testing.assert_close(mt.pi_.double(), ref_pi.double(), rtol=0, atol=1e-6)
    ours = mt.predict_dataset([x[:12], x[12:]])
    m = copy.deepcopy(visual).eval()
    with torch.no_grad():
        for k in torch.unique(mt.labels_).tolist():
            idx = mt.labels_ == k
            m.load_state_dict(multitask_merge_reference(theta_0, taus, mt.cluster_pi_[k].tolist()))
            torch.testing.assert_close(ours[idx], head(m(x[idx])), rtol=1e-4, atol=1e-4)


def test_multitask_validation() -> None:
    base, theta_0, thetas, head, x = _setup()
    with pytest.raises(ValueError, match="exactly one"):
        DaWinMultiTask(base, theta_0)
    bad = dict(thetas[1])
    bad["3.bias"] = torch.zeros(13)
    with pytest.raises(IncompatibleStateDictsError, match="3.bias"):
        DaWinMultiTask(base, theta_0, [thetas[0], bad])
    nan = {k: v.clone() for k, v in thetas[2].items()}
    nan["0.weight"][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"task vector 1\['0.weight'\]"):
        DaWinMultiTask(base, theta_0, [thetas[0], nan])
    with pytest.raises(ValueError, match="n_clusters"):
        DaWinMultiTask(base, theta_0, thetas, n_clusters=0)
    with pytest.raises(ValueError, match="more than the 4 samples"):
        DaWinMultiTask(base, theta_0, thetas, head=head, n_clusters=5).fit([x[:4]])
    with pytest.raises(ValueError, match="no samples"):
        DaWinMultiTask(base, theta_0, thetas, head=head).fit([])
    with pytest.raises(ValueError, match="1 to 15 tasks"):
        DaWinMultiTask(base, theta_0, [theta_0] * 16)
    xn = x.clone()
    xn[7, 1] = float("nan")
    with pytest.raises(ValueError, match="sample 7"):
        DaWinMultiTask(base, theta_0, thetas, head=head).fit([xn])


def test_multitask_exact_mode_matches_per_sample_merges() -> None:
    base, theta_0, thetas, head, x = _setup(n_tasks=3, seed=7)
    mt = DaWinMultiTask(base, theta_0, thetas, head=head).fit([x])
    out = mt.predict(x[:10], mode="exact")
    pi, taus = _reference_pi(base, theta_0, thetas, head, x[:10])
    m = copy.deepcopy(base)
    with torch.no_grad():
        for i in range(10):
            m.load_state_dict(multitask_merge_reference(theta_0, taus, pi[i].tolist()))
            torch.testing.assert_close(out[i], head(m(x[i : i + 1]))[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mt.predict_dataset([x[:45], x[45:]], mode="exact")[:10], out, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_multitask_on_cuda_matches_cpu() -> None:
    base, theta_0, thetas, head, x = _setup(seed=4)
    cpu = DaWinMultiTask(base, theta_0, thetas, head=head, n_clusters=2).fit([x[:45], x[45:]])

    def on_cuda(sd):
        return {k: v.cuda() for k, v in sd.items()}

    gpu = DaWinMultiTask(
        copy.deepcopy(base).cuda(),
        on_cuda(theta_0),
        [on_cuda(t) for t in thetas],
        head=copy.deepcopy(head).cuda(),
        n_clusters=2,
    ).fit([x[:45], x[45:]])
    torch.testing.assert_close(gpu.pi_, cpu.pi_, rtol=0, atol=1e-5)
    torch.testing.assert_close(gpu.predict(x[:45]).cpu(), cpu.predict(x[:45]), rtol=1e-4, atol=1e-4)
