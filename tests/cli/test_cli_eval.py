"""``dawin-ext eval`` end to end on a tiny generated ImageFolder with tiny generated open_clip checkpoints.

Every method's per-sample output, as the command attributes it to that method's name, is recomputed here
without the package's accelerated code: the stock open_clip model and its own zero-shot helper, weights merged by
dict comprehension per sample / per cluster / per alpha, lambda from plain torch entropies; only the Beta-mixture
EM and AdaWiSE's Bayesian optimisation come from the plain mirrors in ``dawin_ext.testing.reference_methods`` (NumPy,
SciPy, scikit-learn; they import nothing from the methods they check). The fine-tuned checkpoint is the zero-shot
one trained for a few steps, so the methods' outputs differ from each other (checked), and a swapped method, a
wrong lambda or a wrong cluster routing changes what the command reports.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_setup import (
    ALL_METHODS,
    ALPHA,
    ARCH,
    ARCH_RN,
    CLASSNAMES,
    PER_CLASS,
    accuracy_of,
    assert_matches_expected,
    assert_methods_differ,
    build_setup,
    eval_args,
    expected_outputs,
    run_eval_all_methods,
)
from torch import nn

from dawin_ext import cli
from dawin_ext.cli import eval as evaluate
from dawin_ext.integrations.checkpoints import save_state_dict
from dawin_ext.integrations.openclip import CLIPClassifier

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: threads only add spinning


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("eval"), ARCH, "dawin-tiny-vit", n_sets=2, train_steps=4, train_lr=3e-3)


@pytest.fixture(scope="module")
def setup_rn(tmp_path_factory):
    return build_setup(
        tmp_path_factory.mktemp("eval_rn"), ARCH_RN, "dawin-tiny-rn", n_sets=1, train_steps=20, train_lr=1e-2
    )


def test_eval_all_methods_match_plain_computation(setup, capsys, per_sample):
    results, captured = run_eval_all_methods(eval_args(setup), setup["tmp"] / "results.json", capsys)
    assert_methods_differ([expected_outputs(setup, root) for root in setup["sets"]], ALL_METHODS)
    for root in setup["sets"]:
        expected = expected_outputs(setup, root)
        assert_matches_expected(per_sample, results["accuracy"], expected, ALL_METHODS, root.name)
        assert results["test_sets"][root.name]["samples"] == PER_CLASS * len(CLASSNAMES)
    # The table: one row per method, one column per set plus the mean.
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["method", "set_a", "set_b", "mean"]
    row = dict((ln.split()[0], [float(v) for v in ln.split()[1:]]) for ln in lines[1:])
    for m in ALL_METHODS:
        a, b = (results["accuracy"][m][s.name] for s in setup["sets"])
        assert row[m] == pytest.approx([100 * a, 100 * b, 50 * (a + b)], abs=0.006), m
    assert "labels matched to class names by folder name" in captured.err


def test_eval_resnet_tower(setup_rn, capsys, per_sample):
    methods = ["zeroshot", "finetuned", "wise-ft", "dawin-cluster", "dawin-exact"]
    out_json = setup_rn["tmp"] / "results.json"
    rc = cli.main(eval_args(setup_rn, "--alpha", str(ALPHA), "--methods", *methods, "--json", str(out_json)))
    assert rc == 0, capsys.readouterr().err
    got = json.loads(out_json.read_text())["accuracy"]
    root = setup_rn["sets"][0]
    expected = expected_outputs(setup_rn, root)
    # The ResNet tower's zero-shot head predicts one class at random init, so only the outputs (not the
    # predicted classes) are required to differ here; the ViT test above covers differing predictions.
    assert_methods_differ([expected], methods, predictions=False)
    assert_matches_expected(per_sample, got, expected, methods, root.name)


def test_eval_subprocess_and_progress(setup):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "dawin_ext.cli",
        *eval_args(setup, "--alpha", str(ALPHA), "--methods", "zeroshot", "finetuned", "ensemble"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["method", "zeroshot", "finetuned", "ensemble"]
    assert "zero-shot + fine-tuned logits" in proc.stderr  # the tqdm bar
    for ln in lines[1:]:
        m = ln.split()[0]
        expected = [accuracy_of(expected_outputs(setup, r)[m], expected_outputs(setup, r)["y"]) for r in setup["sets"]]
        got = [float(v) for v in ln.split()[1:3]]
        assert got == pytest.approx([100 * e for e in expected], abs=0.006), m


def test_saved_module_checkpoint_needs_trust(setup, capsys):
    module_path = setup["tmp"] / "ft_module.pt"
    stock = setup["stock"]  # a whole module of the package's classifier class, as users save it
    ft_module = CLIPClassifier(copy.deepcopy(stock.visual), stock.head.weight.detach(), stock.head.bias.detach())
    ft_module.load_state_dict(setup["theta_ft"])
    torch.save(ft_module, module_path)
    rc = cli.main(eval_args(setup, "--methods", "finetuned", ft=module_path))
    err = capsys.readouterr().err
    assert rc == 2
    assert "refusing to load" in err and "--trust-pickle" in err and "CLIPClassifier" in err
    out_json = setup["tmp"] / "trusted.json"
    rc = cli.main(eval_args(setup, "--methods", "finetuned", "--trust-pickle", "--json", str(out_json), ft=module_path))
    assert rc == 0
    got = json.loads(out_json.read_text())["accuracy"]["finetuned"]
    expected = {
        r.name: accuracy_of(expected_outputs(setup, r)["finetuned"], expected_outputs(setup, r)["y"])
        for r in setup["sets"]
    }
    assert got == pytest.approx(expected, abs=1e-12)


def _bad_checkpoints(setup) -> dict[str, Path]:
    tmp = setup["tmp"]
    paths = {}
    two_class = {k: v.clone() for k, v in setup["theta_ft"].items()}
    two_class["head.weight"] = two_class["head.weight"][:2]
    two_class["head.bias"] = two_class["head.bias"][:2]
    paths["rows"] = save_state_dict(tmp / "rows.safetensors", two_class)
    half = {k: v.half() for k, v in setup["theta_ft"].items()}
    paths["dtype"] = save_state_dict(tmp / "half.safetensors", half)
    nan = {k: v.clone() for k, v in setup["theta_ft"].items()}
    nan["head.bias"][1] = float("nan")
    paths["nan"] = save_state_dict(tmp / "nan.safetensors", nan)
    other = {k: v for k, v in setup["theta_ft"].items() if k != "visual.ln_post.weight"}
    paths["missing"] = save_state_dict(tmp / "missing.safetensors", other)
    paths["linear"] = save_state_dict(tmp / "linear.safetensors", nn.Linear(3, 2))
    return paths


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("rows", "'head.weight' has 2 rows (classes) but 3 class names"),
        ("dtype", "key 'visual.class_embedding': zero-shot '"),
        ("nan", "fine-tuned checkpoint '"),
        ("missing", "missing.safetensors' is missing key 'visual.ln_post.weight'"),
        ("linear", "linear.safetensors': unrecognised checkpoint layout"),
        ("no-file", "--finetuned"),
        ("class-count", "has 3 class folders but --classnames gives 4 classes"),
        ("duplicate", "'apple' appears twice"),
        ("alpha", "--alpha must be in [0, 1], got 1.5"),
        ("method", "unknown method 'dawin'"),
        ("device", "--device cuda:7"),
        ("not-imagefolder", "is not an ImageFolder layout"),
        ("arch", "unknown open_clip architecture 'dawin-evaltest-vti'"),
        ("batch", "--batch-size must be >= 1, got 0"),
        ("temperature", "--temperatures must be finite and > 0"),
    ],
)
def test_eval_bad_input(setup, capsys, case, fragment):
    bad = _bad_checkpoints(setup)
    kwargs, extra = {}, []
    if case in bad:
        kwargs["ft"] = bad[case]
    elif case == "no-file":
        kwargs["ft"] = setup["tmp"] / "absent.safetensors"
    elif case == "class-count":
        kwargs["classnames"] = ",".join([*CLASSNAMES, "extra"])
    elif case == "duplicate":
        kwargs["classnames"] = "apple,kite,apple"
    elif case == "alpha":
        extra = ["--alpha", "1.5"]
    elif case == "method":
        extra = ["--methods", "zeroshot", "dawin"]
    elif case == "device":
        extra = ["--device", "cuda:7"]
    elif case == "not-imagefolder":
        empty = setup["tmp"] / "empty_set"
        empty.mkdir(exist_ok=True)
        kwargs["data"] = [empty]
    elif case == "batch":
        extra = ["--batch-size", "0"]
    elif case == "temperature":
        extra = ["--temperatures", "1", "0"]
    args = eval_args(setup, *extra, **kwargs)
    if case == "arch":
        args[args.index("--model") + 1] = "dawin-evaltest-vti"
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert fragment in err
    if case == "nan":
        assert "nan.safetensors': key 'head.bias' holds NaN or Inf" in err
    if case == "dtype":
        assert "has dtype torch.float32 but fine-tuned '" in err and "half.safetensors' has torch.float16" in err


def test_corrupt_image_is_named(setup, capsys):
    broken = setup["tmp"] / "broken_set"
    for name in CLASSNAMES:
        (broken / name).mkdir(parents=True, exist_ok=True)
        (broken / name / "ok.png").write_bytes((setup["sets"][0] / name / "00.png").read_bytes())
    (broken / "kite" / "bad.png").write_bytes(b"\x89PNG not really")
    rc = cli.main(eval_args(setup, "--methods", "zeroshot", data=[broken]))
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot read image" in err and "bad.png" in err


def test_unavailable_methods_are_skipped_or_refused(setup, capsys, monkeypatch):

    monkeypatch.setattr(
        evaluate, "_method_available", lambda m: None if m == "zeroshot" else "not available in this test"
    )
    out_json = setup["tmp"] / "skipped.json"
    rc = cli.main(eval_args(setup, "--json", str(out_json)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    results = json.loads(out_json.read_text())
    assert list(results["accuracy"]) == ["zeroshot"]
    assert set(results["skipped"]) == set(evaluate.METHODS) - {"zeroshot"}
    assert "skipping adawise: not available in this test" in captured.err
    assert "adawise" in captured.out and "skipped: not available in this test" in captured.out
    # Asked for by name, an unavailable method is an error, not a silent omission.
    rc = cli.main(eval_args(setup, "--methods", "zeroshot", "adawise"))
    assert rc == 2
    assert "--methods: adawise is not available in this test" in capsys.readouterr().err
