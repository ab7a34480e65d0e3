"""Saving and loading fitted predictors: round trips, refusal of other weights, damaged files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fit_tiny_dawin, mlp_pair
from torch import nn

from dawin_ext.methods.adawise import AdaWiSE
from dawin_ext.methods.dawin import DaWin
from dawin_ext.methods.multitask import DaWinMultiTask
from dawin_ext.methods.persistence import (
    FORMAT_VERSION,
    META_NAME,
    TENSORS_NAME,
    SavedStateError,
    WeightMismatchError,
    state_dict_digests,
)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
TEMPS = (0.9576, 0.9733)


@pytest.fixture(scope="module")
def fitted_clip(tmp_path_factory):
    """A DaWin fitted on the tiny open_clip ViT, saved once for the module."""
    dw, clf, zs, ft, x = fit_tiny_dawin(TEMPS)
    path = tmp_path_factory.mktemp("saved") / "dawin"
    dw.save(path)
    return dw, clf, zs, ft, x, path


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("mode", ["cluster", "exact"])
def test_dawin_round_trip_gives_identical_logits(fitted_clip, mode: str) -> None:
    dw, clf, zs, ft, x, path = fitted_clip
    loaded = DaWin.load(path, clf, zs, ft)
    assert torch.equal(loaded.predict(x[:12], mode=mode), dw.predict(x[:12], mode=mode))
    assert torch.equal(
        loaded.predict_dataset([x[:20], x[20:]], mode=mode), dw.predict_dataset([x[:20], x[20:]], mode=mode)
    )
    assert loaded.offset_ == dw.offset_ and loaded.temperatures == dw.temperatures
    assert torch.equal(loaded.cluster_coefficients_, dw.cluster_coefficients_)
    for k in ("weights_", "alphas_", "betas_", "means_"):
        np.testing.assert_array_equal(getattr(loaded.mixture_, k), getattr(dw.mixture_, k))
    # The saved files hold no weights: only the fit's results.
    assert (path / TENSORS_NAME).stat().st_size < 0.2 * sum(v.numel() * v.element_size() for v in zs.values())


@pytest.mark.parametrize(
    ("expertise", "offset", "pseudo"),
    [("entropy", False, "ensemble_soft"), ("cross_entropy", True, "true"), ("cross_entropy", False, "merged_soft"),
     ("output_ensemble", True, "ensemble_soft"), ("selective", False, "ensemble_soft")],
)  # fmt: skip
def test_dawin_round_trip_settings(tmp_path, expertise: str, offset: bool, pseudo: str) -> None:
    model, zs, ft, x, y = mlp_pair(n_samples=96)
    loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    dw = DaWin(model, zs, ft, expertise=expertise, temperatures=TEMPS, offset_adjustment=offset, pseudo_label=pseudo)
    dw.fit(loader)
    dw.save(tmp_path / "d")
    loaded = DaWin.load(tmp_path / "d", model, zs, ft)
    for k in ("expertise", "temperatures", "offset_adjustment", "n_clusters", "seed", "pseudo_label", "offset_"):
        assert getattr(loaded, k) == getattr(dw, k), k
    assert torch.equal(loaded.predict_dataset(loader), dw.predict_dataset(loader))
    yb = y[:32] if pseudo == "true" else None
    assert torch.equal(loaded.predict(x[:32], y=yb), dw.predict(x[:32], y=yb))
    assert torch.equal(loaded.fit_labels_, dw.fit_labels_)


def test_multitask_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 24), nn.LayerNorm(24), nn.GELU(), nn.Linear(24, 12))
    theta_0 = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    thetas = [{k: v + 0.4 * torch.randn(v.shape, generator=g) for k, v in theta_0.items()} for _ in range(3)]
    head = nn.Linear(12, 5)
    x = torch.randn(60, 8, generator=g) * torch.rand(60, 1, generator=g).mul(4)
    mt = DaWinMultiTask(base, theta_0, thetas, head=head, n_clusters=2).fit([x[:30], x[30:]])
    mt.save(tmp_path / "mt")
    loaded = DaWinMultiTask.load(tmp_path / "mt", base, theta_0, thetas, head=head)
    for mode in ("cluster", "exact"):
        assert torch.equal(loaded.predict(x[:16], mode=mode), mt.predict(x[:16], mode=mode))
    assert torch.equal(loaded.predict_dataset([x[:30], x[30:]]), mt.predict_dataset([x[:30], x[30:]]))

    other = [dict(t) for t in thetas]
    other[1] = {**other[1], "3.bias": other[1]["3.bias"] + 1e-3}
    with pytest.raises(WeightMismatchError, match=r"task 1 .*'3\.bias'"):
        DaWinMultiTask.load(tmp_path / "mt", base, theta_0, other, head=head)
    other_head = nn.Linear(12, 5)
    with pytest.raises(WeightMismatchError, match="head"):
        DaWinMultiTask.load(tmp_path / "mt", base, theta_0, thetas, head=other_head)
    with pytest.raises(WeightMismatchError, match="3 tasks but 2"):
        DaWinMultiTask.load(tmp_path / "mt", base, theta_0, thetas[:2], head=head)


def test_adawise_warm_start_round_trip(tmp_path) -> None:
    model, zs, ft, x, _ = mlp_pair(5, n_samples=96)
    ft = {k: v * 1.5 for k, v in ft.items()}
    batches = [x[:32], x[32:64], x[64:]]
    ada = AdaWiSE(model, zs, ft, n_evals=5, n_init=2, seed=0)
    ada.predict(batches[0])
    ada.save(tmp_path / "a")
    loaded = AdaWiSE.load(tmp_path / "a", model, zs, ft)
    assert loaded.best_alpha_ == ada.best_alpha_ and loaded.history_ == ada.history_
    np.testing.assert_array_equal(loaded._kernel.theta, ada._kernel.theta)
    # The next batch warm-starts identically.
    assert torch.equal(loaded.predict(batches[1]), ada.predict(batches[1]))
    assert loaded.history_ == ada.history_
    with pytest.raises(WeightMismatchError, match="theta_zs"):
        AdaWiSE.load(tmp_path / "a", model, {k: v + 1 for k, v in zs.items()}, ft)


# --------------------------------------------------------------------------------------------- refusals
def test_load_refuses_other_weights(fitted_clip) -> None:
    _, clf, zs, ft, _, path = fitted_clip
    key = "visual.proj" if "visual.proj" in ft else next(k for k, v in ft.items() if v.is_floating_point())
    changed = dict(ft)
    changed[key] = ft[key].clone()
    changed[key].view(-1)[0] += 1e-6
    with pytest.raises(WeightMismatchError, match=rf"theta_ft .*1 key\(s\) hold different values.*'{key}'"):
        DaWin.load(path, clf, zs, changed)
    with pytest.raises(WeightMismatchError, match="theta_zs"):  # swapped
        DaWin.load(path, clf, ft, zs)
    missing = {k: v for k, v in zs.items() if k != key}
    with pytest.raises(WeightMismatchError, match="missing"):
        DaWin.load(path, clf, missing, ft)
    as_double = {k: v.double() if v.is_floating_point() else v for k, v in zs.items()}
    with pytest.raises(WeightMismatchError, match="theta_zs"):  # dtype is part of the hash
        DaWin.load(path, clf, as_double, ft)


def test_digests_cover_names_dtype_shape_and_values() -> None:
    sd = {"a": torch.arange(6.0), "b": torch.tensor(3)}
    base, per_key = state_dict_digests(sd)
    assert set(per_key) == {"a", "b"} and state_dict_digests({k: v.clone() for k, v in sd.items()})[0] == base
    variants = [
        {"a": torch.arange(6.0).reshape(2, 3), "b": sd["b"]},
        {"a": torch.arange(6.0).double(), "b": sd["b"]},
        {"a": torch.arange(6.0), "b": torch.tensor(4)},
        {"c": torch.arange(6.0), "b": sd["b"]},
        {"a": sd["a"]},
        {"a": torch.arange(6.0).bfloat16(), "b": sd["b"]},
    ]
    digests = {state_dict_digests(v)[0] for v in variants}
    assert base not in digests and len(digests) == len(variants)
    assert state_dict_digests({"b": sd["b"], "a": sd["a"]})[0] == base  # key order is not content
    strided = torch.arange(6.0).repeat_interleave(2)[::2]  # the same values through a non-contiguous view
    assert not strided.is_contiguous()
    assert state_dict_digests({"a": strided, "b": sd["b"]})[0] == base


@pytest.fixture
def saved_mlp(tmp_path):
    model, zs, ft, x, _ = mlp_pair(n_samples=96)
    DaWin(model, zs, ft, temperatures=TEMPS).fit([x]).save(tmp_path / "d")
    return tmp_path / "d", model, zs, ft


def test_truncated_tensor_file_is_refused(saved_mlp) -> None:
    path, model, zs, ft = saved_mlp
    data = (path / TENSORS_NAME).read_bytes()
    (path / TENSORS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(SavedStateError, match=r"bytes but .* were written \(truncated"):
        DaWin.load(path, model, zs, ft)


def test_corrupted_tensor_file_is_refused(saved_mlp) -> None:
    path, model, zs, ft = saved_mlp
    data = bytearray((path / TENSORS_NAME).read_bytes())
    data[-5] ^= 0x40  # one flipped bit inside the tensor data
    (path / TENSORS_NAME).write_bytes(bytes(data))
    with pytest.raises(SavedStateError, match="corrupted"):
        DaWin.load(path, model, zs, ft)


def test_damaged_meta_and_other_versions_are_refused(saved_mlp) -> None:
    path, model, zs, ft = saved_mlp
    text = (path / META_NAME).read_text()
    (path / META_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(SavedStateError, match="not valid JSON"):
        DaWin.load(path, model, zs, ft)

    meta = json.loads(text)
    meta["format_version"] = FORMAT_VERSION + 1
    (path / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(SavedStateError, match=rf"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        DaWin.load(path, model, zs, ft)

    meta["format_version"] = FORMAT_VERSION
    (path / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(SavedStateError, match="written by 'DaWin', not 'DaWinMultiTask'"):
        DaWinMultiTask.load(path, model, zs, [ft])
    del meta["settings"]
    (path / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(SavedStateError, match="lacks 'settings'"):
        DaWin.load(path, model, zs, ft)

    (path / TENSORS_NAME).unlink()
    with pytest.raises(SavedStateError, match="missing"):
        DaWin.load(path, model, zs, ft)
    with pytest.raises(SavedStateError, match="not a directory"):
        DaWin.load(path / "nowhere", model, zs, ft)


def test_save_needs_a_fit_and_leaves_no_temporary_files(tmp_path) -> None:
    model, zs, ft, x, _ = mlp_pair(n_samples=96)
    dw = DaWin(model, zs, ft)
    with pytest.raises(RuntimeError, match="fit"):
        dw.save(tmp_path / "d")
    dw.fit([x]).save(tmp_path / "d")
    dw.save(tmp_path / "d")  # overwriting is fine
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [META_NAME, TENSORS_NAME]
