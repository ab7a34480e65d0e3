"""``dawin-ext eval`` end to end on a tiny generated ImageFolder with tiny generated open_clip checkpoints.

Every accuracy the command prints is recomputed here from the plain mirrors in ``dawin_ext.reference`` /
``dawin_ext.reference_algorithms`` (dict-comprehension merges, per-sample merges, the reference EM), so a wiring
mistake in the command (wrong labels, wrong head, wrong alpha, methods swapped) makes the comparison fail.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dawin_ext import cli
from dawin_ext.checkpoints import save_state_dict
from dawin_ext.openclip import TINY_MODEL_CONFIGS, CLIPClassifier, create_clip_model, register_model_config

ARCH = "dawin-evaltest-vit"
ARCH_RN = "dawin-evaltest-rn"  # ModifiedResNet image tower (BatchNorm, attention pooling)
# Deliberately not in sorted order: the folders are matched to these names by name.
CLASSNAMES = ["zebra", "apple", "kite"]
TEMPLATES = "simple"
ALPHA = 0.3
_expected_cache: dict[Path, dict[str, float]] = {}
BATCH = 8
ADAWISE_EVALS = 4
PER_CLASS = 6


def _write_images(root: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSNAMES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            # Class-dependent colour plus noise, odd sizes so resize and crop do real work.
            base = np.array([60 + 80 * c, 200 - 70 * c, 40 + 50 * ((c + i) % 3)], dtype=np.float64)
            img = np.clip(base + rng.normal(0, 60, size=(37 + i, 41, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: threads only add spinning


def _build(tmp: Path, arch: str, tiny: str, n_sets: int) -> dict:
    cfg_path = tmp / f"{arch}.json"
    cfg_path.write_text(json.dumps(TINY_MODEL_CONFIGS[tiny]))
    register_model_config(cfg_path)
    torch.manual_seed(0)
    model, preprocess, tokenizer = create_clip_model(arch)
    # Zero-shot checkpoint: a whole CLIP state dict (the command builds the head from the text tower).
    zs_path = save_state_dict(tmp / "zs.safetensors", model.state_dict())
    zs = CLIPClassifier.from_clip(model, tokenizer, CLASSNAMES, TEMPLATES)
    theta_zs = {k: v.clone() for k, v in zs.state_dict().items()}
    # Fine-tuned checkpoint: classifier layout, theta_0 perturbed, saved as a weights-only torch file.
    g = torch.Generator().manual_seed(1)
    theta_ft = {}
    for k, v in theta_zs.items():
        if not v.is_floating_point():  # e.g. BatchNorm's num_batches_tracked
            theta_ft[k] = v.clone()
            continue
        scale = 0.4 * float(v.std()) if v.numel() > 1 else 0.05
        theta_ft[k] = v + scale * torch.randn(v.shape, generator=g)
    ft_path = tmp / "ft.pt"
    torch.save(theta_ft, ft_path)
    sets = [tmp / name for name in ("set_a", "set_b")[:n_sets]]
    for i, s in enumerate(sets):
        _write_images(s, seed=10 + i)
    return {
        "arch": arch,
        "tmp": tmp,
        "cfg": cfg_path,
        "zs": zs_path,
        "ft": ft_path,
        "sets": sets,
        "base": zs,
        "theta_zs": theta_zs,
        "theta_ft": theta_ft,
        "preprocess": preprocess,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("eval"), ARCH, "dawin-tiny-vit", n_sets=2)


@pytest.fixture(scope="module")
def setup_rn(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("eval_rn"), ARCH_RN, "dawin-tiny-rn", n_sets=1)


def _args(setup, *extra: str, data=None, zs=None, ft=None, classnames=None) -> list[str]:
    return [
        "eval",
        "--model",
        setup["arch"],
        "--model-config",
        str(setup["cfg"]),
        "--zeroshot",
        str(zs or setup["zs"]),
        "--finetuned",
        str(ft or setup["ft"]),
        "--classnames",
        classnames or ",".join(CLASSNAMES),
        "--templates",
        TEMPLATES,
        "--data",
        *[str(d) for d in (data or setup["sets"])],
        "--batch-size",
        str(BATCH),
        "--workers",
        "0",
        *extra,
    ]


def _load_set(root: Path, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in ImageFolder's order (folders, then files, sorted), labelled by position in CLASSNAMES."""
    xs, ys = [], []
    for name in sorted(CLASSNAMES):
        for f in sorted((root / name).iterdir()):
            xs.append(preprocess(Image.open(f).convert("RGB")))
            ys.append(CLASSNAMES.index(name))
    return torch.stack(xs), torch.tensor(ys)


def _acc(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(1) == y).double().mean())


@torch.no_grad()
def _expected(setup, root: Path) -> dict[str, float]:
    from dawin_ext.adawise import make_gp
    from dawin_ext.reference import interpolation_reference
    from dawin_ext.reference_algorithms import (
        adawise_reference,
        beta_mixture_reference,
        dawin_cluster_loop_reference,
        dawin_coefficients_reference,
    )

    if root in _expected_cache:
        return _expected_cache[root]
    with_adawise = setup["arch"] == ARCH
    x, y = _load_set(root, setup["preprocess"])
    base, zs, ft = setup["base"], setup["theta_zs"], setup["theta_ft"]
    model = copy.deepcopy(base).eval()

    def logits(sd, inputs=x):
        model.load_state_dict(sd)
        return model(inputs)

    lz, lf = logits(zs), logits(ft)
    lam = dawin_coefficients_reference(lz, lf)
    mix = beta_mixture_reference(lam.numpy(), n_mixtures=3, seed=1)
    batches = list(x.split(BATCH))
    cluster = dawin_cluster_loop_reference(base, zs, ft, batches, mix["labels"], mix["means"])
    exact = torch.cat([logits(interpolation_reference(float(lam[i]), zs, ft), x[i : i + 1]) for i in range(len(x))])
    if with_adawise:
        _, ada = adawise_reference(
            base, zs, ft, batches, make_gp=lambda k: make_gp(k, seed=1), n_evals=ADAWISE_EVALS, n_init=3
        )
    ens = (1 - ALPHA) * F.softmax(lz, 1) + ALPHA * F.softmax(lf, 1)
    _expected_cache[root] = {
        "zeroshot": _acc(lz, y),
        "finetuned": _acc(lf, y),
        "wise-ft": _acc(logits(interpolation_reference(ALPHA, zs, ft)), y),
        "ensemble": _acc(ens, y),
        "dawin-cluster": _acc(cluster, y),
        "dawin-exact": _acc(exact, y),
    }
    if with_adawise:
        _expected_cache[root]["adawise"] = _acc(torch.cat(ada), y)
    return _expected_cache[root]


def test_eval_all_methods_match_plain_mirrors(setup, capsys):
    out_json = setup["tmp"] / "results.json"
    rc = cli.main(_args(setup, "--alpha", str(ALPHA), "--adawise-evals", str(ADAWISE_EVALS), "--json", str(out_json)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    results = json.loads(out_json.read_text())
    assert results["skipped"] == {}
    assert list(results["accuracy"]) == [
        "zeroshot",
        "finetuned",
        "wise-ft",
        "ensemble",
        "dawin-cluster",
        "dawin-exact",
        "adawise",
    ]
    for root in setup["sets"]:
        expected = _expected(setup, root)
        got = {m: accs[root.name] for m, accs in results["accuracy"].items()}
        assert got == pytest.approx(expected, abs=1e-12), root.name
        assert results["test_sets"][root.name]["samples"] == PER_CLASS * len(CLASSNAMES)
    # The table: one row per method, one column per set plus the mean.
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["method", "set_a", "set_b", "mean"]
    row = dict((ln.split()[0], [float(v) for v in ln.split()[1:]]) for ln in lines[1:])
    za, zb = (results["accuracy"]["zeroshot"][s.name] for s in setup["sets"])
    assert row["zeroshot"] == pytest.approx([100 * za, 100 * zb, 50 * (za + zb)], abs=0.006)
    assert "labels matched to class names by folder name" in captured.err


def test_eval_resnet_tower(setup_rn, capsys):
    methods = ["zeroshot", "finetuned", "wise-ft", "dawin-cluster", "dawin-exact"]
    out_json = setup_rn["tmp"] / "results.json"
    rc = cli.main(_args(setup_rn, "--alpha", str(ALPHA), "--methods", *methods, "--json", str(out_json)))
    assert rc == 0, capsys.readouterr().err
    got = json.loads(out_json.read_text())["accuracy"]
    root = setup_rn["sets"][0]
    expected = _expected(setup_rn, root)
    assert {m: got[m][root.name] for m in methods} == pytest.approx({m: expected[m] for m in methods}, abs=1e-12)


def test_eval_subprocess_and_progress(setup):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dawin_ext.cli", *_args(setup, "--methods", "zeroshot", "finetuned", "ensemble")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["method", "zeroshot", "finetuned", "ensemble"]
    assert "zero-shot + fine-tuned logits" in proc.stderr  # the tqdm bar
    expected = [_expected(setup, root)["zeroshot"] for root in setup["sets"]]
    got = [float(v) for v in lines[1].split()[1:3]]
    assert got == pytest.approx([100 * e for e in expected], abs=0.006)


def test_saved_module_checkpoint_needs_trust(setup, capsys):
    module_path = setup["tmp"] / "ft_module.pt"
    ft_module = copy.deepcopy(setup["base"])
    ft_module.load_state_dict(setup["theta_ft"])
    torch.save(ft_module, module_path)
    rc = cli.main(_args(setup, "--methods", "finetuned", ft=module_path))
    err = capsys.readouterr().err
    assert rc == 2
    assert "refusing to load" in err and "--trust-pickle" in err and "CLIPClassifier" in err
    out_json = setup["tmp"] / "trusted.json"
    rc = cli.main(_args(setup, "--methods", "finetuned", "--trust-pickle", "--json", str(out_json), ft=module_path))
    assert rc == 0
    got = json.loads(out_json.read_text())["accuracy"]["finetuned"]
    assert got == pytest.approx({r.name: _expected(setup, r)["finetuned"] for r in setup["sets"]}, abs=1e-12)


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
        ("missing", "missing.safetensors': is missing key 'visual.ln_post.weight'"),
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
    args = _args(setup, *extra, **kwargs)
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
        (broken / name / "ok.png").write_bytes((setup["sets"][0] / name / "0.png").read_bytes())
    (broken / "kite" / "bad.png").write_bytes(b"\x89PNG not really")
    rc = cli.main(_args(setup, "--methods", "zeroshot", data=[broken]))
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot read image" in err and "bad.png" in err


def test_unavailable_methods_are_skipped_or_refused(setup, capsys, monkeypatch):
    from dawin_ext import evaluate

    monkeypatch.setattr(
        evaluate, "_method_available", lambda m: None if m == "zeroshot" else "not available in this test"
    )
    out_json = setup["tmp"] / "skipped.json"
    rc = cli.main(_args(setup, "--json", str(out_json)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    results = json.loads(out_json.read_text())
    assert list(results["accuracy"]) == ["zeroshot"]
    assert set(results["skipped"]) == set(evaluate.METHODS) - {"zeroshot"}
    assert "skipping adawise: not available in this test" in captured.err
    assert "adawise" in captured.out and "skipped: not available in this test" in captured.out
    # Asked for by name, an unavailable method is an error, not a silent omission.
    rc = cli.main(_args(setup, "--methods", "zeroshot", "adawise"))
    assert rc == 2
    assert "--methods: adawise is not available in this test" in capsys.readouterr().err
