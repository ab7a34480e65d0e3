"""`dawin-ext bench --check`: the comparison of measured rows with the documented targets, on synthetic rows.

No timing here (timings belong to the benchmarks): the rows are made up, shaped like one full-size CPU run of
`kernel_rows` + `pipeline_rows`, and each test moves one figure across its target.
"""

from __future__ import annotations

import pytest
import torch

import dawin_ext.cli.bench as bench
from dawin_ext import cli
from dawin_ext.cli.bench import TARGETS, check_targets, format_check

VIT = "ViT-B-32 151M params fp32, K=3"
PIPE = "ViT-B-32, batch 64"


def _row(op, case, ours, reference=None, ref_s=None, **extra):
    return bench._row(op, case, ours, reference, ref_s, **extra)


def _cpu_rows(**ratio) -> list[dict]:
    """A full-size CPU run where every target holds, except the figures given in ``ratio`` (by target key)."""
    r = {
        "entropy-4096": 4.5,
        "blend-new-outputs": 3.3,
        "blend-out-vs-comprehension": 14.5,
        "blend-out-vs-lerp": 2.35,
        "dawin-cluster-x-plain": 2.9,
        "dawin-cluster-vs-reference": 2.4,
        "exact-x-plain": 0.65,
        "exact-vs-loop": 4.4,
        "exact-vit-small": 0.97,
        "exact-hf-clip-vision": 1.23,
        "exact-convnext-atto": 1.9,
        "exact-resnet18": 1.7,
        **ratio,
    }
    if "exact-x-plain-vs-old-engine" in ratio:  # the same row as exact-x-plain, against the tighter bound
        r["exact-x-plain"] = ratio["exact-x-plain-vs-old-engine"]
    models = {
        "exact-vit-small": "timm vit_small_patch16_224, batch 16, 224px: S=2",
        "exact-hf-clip-vision": "transformers CLIPVisionModel ViT-B/32, batch 16, 224px: S=2",
        "exact-convnext-atto": "timm convnext_atto, batch 16, 64px: S=2",
        "exact-resnet18": "timm resnet18, batch 16, 64px: S=2",
    }
    exact_models = []
    for key, case in models.items():
        exact_models += [
            _row("exact engine", case, r[key], "plain forward", 1.0, over_plain=r[key]),
            # the one-source row of the same case must not stand in for the plain-forward one
            _row("exact engine", case, r[key], "same engine, 1 source", 0.1, over_one_source=9.0),
        ]
    plain = 3.0
    return [
        _row("softmax_entropy", "1024x1000 fp32", 1.0, "-(softmax*log_softmax).sum(-1)", 1.1),  # no target
        _row("softmax_entropy", "4096x1000 fp32", 1.0, "-(softmax*log_softmax).sum(-1)", r["entropy-4096"]),
        _row("blend", f"{VIT}, new outputs", 1.0, "dict comprehension; fresh memory ~78% of ours",
             r["blend-new-outputs"]),  # fmt: skip
        _row("blend", f"{VIT}, out=", 1.0, "dict comprehension", r["blend-out-vs-comprehension"]),
        _row("blend", f"{VIT}, out=", 1.0, "per-tensor lerp(out=)", r["blend-out-vs-lerp"]),
        # The hint row has "new outputs" too but compares against something else: it must not be picked.
        _row("blend", f"{VIT}, new outputs", 1.0, "into fresh empty_like (4 KiB pages)", 0.1),
        _row("forward", f"{PIPE}: one plain forward pass", plain),
        _row("dawin cluster", f"{PIPE}: streaming predict, K=3", r["dawin-cluster-x-plain"] * plain,
             "re-merge per cluster present", r["dawin-cluster-x-plain"] * plain * r["dawin-cluster-vs-reference"]),
        _row("dawin exact", f"{PIPE}: streaming predict, mode='exact'", plain, "re-merge per cluster present",
             1.1 * plain),  # no target
        _row("dawin exact", f"{PIPE}: per-sample weights, S=2", r["exact-x-plain"] * plain,
             "per-sample merge + forward loop", r["exact-x-plain"] * plain * r["exact-vs-loop"]),
        *exact_models,
    ]  # fmt: skip


def _status(results) -> dict[str, str]:
    return {r["target"].key: r["status"] for r in results}


def test_every_cpu_target_met_passes():
    status = _status(check_targets(_cpu_rows(), "cpu"))
    cpu_keys = [t.key for t in TARGETS if t.device == "cpu"]
    assert {k: status[k] for k in cpu_keys} == dict.fromkeys(cpu_keys, "met")
    assert all(status[t.key] == "other device" for t in TARGETS if t.device != "cpu")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("entropy-4096", 2.9),
        ("blend-new-outputs", 1.65),
        ("blend-out-vs-comprehension", 5.9),
        ("blend-out-vs-lerp", 1.2),
        ("dawin-cluster-x-plain", 3.4),  # an upper bound: more than 3.3x a plain forward misses
        ("dawin-cluster-vs-reference", 1.09),
        ("exact-x-plain", 2.6),
        ("exact-vs-loop", 3.4),
        ("exact-vit-small", 1.6),
        ("exact-hf-clip-vision", 1.51),
        ("exact-convnext-atto", 2.24),
        ("exact-resnet18", 2.1),
        ("exact-x-plain-vs-old-engine", 0.75),
    ],
)
def test_one_figure_across_its_target_is_flagged_alone(key, value):
    results = check_targets(_cpu_rows(**{key: value}), "cpu")
    status = _status(results)
    assert status[key] == "MISSED"
    # exact-x-plain's row also carries the tighter bound against the previous engine
    also = ["exact-x-plain-vs-old-engine"] if key == "exact-x-plain" else []
    assert [k for k, s in status.items() if s not in ("met", "other device")] == [key, *also]
    missed = next(r for r in results if r["target"].key == key)
    assert missed["value"] == pytest.approx(value)
    line = next(ln for ln in format_check(results).splitlines() if key in ln)
    assert line.startswith("MISSED") and f"{value:.3g}" in line


def test_missing_or_quick_rows_are_not_measured():
    rows = [r for r in _cpu_rows() if r["op"] != "forward"]  # no plain forward: x-plain cannot be computed
    status = _status(check_targets(rows, "cpu"))
    assert status["dawin-cluster-x-plain"] == status["exact-x-plain"] == "NOT MEASURED"
    assert status["dawin-cluster-vs-reference"] == "met"
    # --quick rows (a third of the keys, the tiny ViT) are other cases: they never stand in for the targets.
    quick = [{**r, "case": r["case"].replace("ViT-B-32 151M", "ViT-B-32 (1/3 of keys) 50M")} for r in _cpu_rows()]
    assert _status(check_targets(quick, "cpu"))["blend-out-vs-lerp"] == "NOT MEASURED"


def test_gpu_targets_use_the_bandwidth_fraction():
    rows = [
        _row("softmax_entropy", "16384x1000 fp32", 1.0, "-(softmax*log_softmax).sum(-1)", 20.0, bandwidth_fraction=0.9),
        _row("blend", f"{VIT}, out=", 1.0, "dict comprehension", 50.0, bandwidth_fraction=0.7),
    ]
    status = _status(check_targets(rows, torch.device("cuda")))
    assert status["entropy-bandwidth"] == "met"
    assert status["blend-out-bandwidth"] == "MISSED"
    assert status["exact-vs-loop-gpu-256"] == "NOT MEASURED"
    assert status["entropy-4096"] == "other device"


@pytest.mark.parametrize("failing", [None, "blend-out-vs-lerp"])
def test_cli_check_exit_status_names_the_target(monkeypatch, capsys, failing):
    rows = _cpu_rows(**({failing: 1.0} if failing else {}))
    monkeypatch.setattr(bench, "kernel_rows", lambda device, quick=False, repeats=None: rows[:6])
    monkeypatch.setattr(bench, "pipeline_rows", lambda device, quick, repeats: rows[6:10])
    monkeypatch.setattr(bench, "exact_engine_rows", lambda device, quick, repeats: rows[10:])
    rc = cli.main(["bench", "--check"])
    out = capsys.readouterr().out
    if failing:
        assert rc == 1
        assert f"missed or not measured: {failing}" in out
    else:
        assert rc == 0
        assert "MISSED" not in out and "NOT MEASURED" not in out


def test_cli_check_refuses_quick(capsys):
    assert cli.main(["bench", "--check", "--quick"]) == 2
    assert "--check" in capsys.readouterr().err
