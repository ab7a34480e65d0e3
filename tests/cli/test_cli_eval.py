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
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dawin_ext import cli
from dawin_ext.cli import eval as evaluate
from dawin_ext.integrations.checkpoints import save_state_dict
from dawin_ext.integrations.openclip import TINY_MODEL_CONFIGS, CLIPClassifier

ARCH = "dawin-evaltest-vit"
ARCH_RN = "dawin-evaltest-rn"  # ModifiedResNet image tower (BatchNorm, attention pooling)
# Deliberately not in sorted order: the folders are matched to these names by name.
CLASSNAMES = ["zebra", "apple", "kite"]
TEMPLATES = "simple"
ALPHA = 0.3
BATCH = 8
ADAWISE_EVALS = 4
PER_CLASS = 10
SEED = 1  # the command's default --seed (DaWin's mixture, AdaWiSE's GP)
# Noise of the generated test sets: set_b is a harder shift than set_a, and both are harder than the training
# images of the fine-tuned model, so that the fine-tuned model is good but not perfect and lambda spreads.
SET_NOISE = {"set_a": 120.0, "set_b": 200.0}
TRAIN_NOISE = 30.0
ATOL = 1e-4  # the command's blend / exact kernels against per-sample dict-comprehension merges
ALL_METHODS = ["zeroshot", "finetuned", "wise-ft", "ensemble", "dawin-cluster", "dawin-exact", "adawise"]
_expected_cache: dict[Path, dict[str, torch.Tensor]] = {}


def _images(seed: int, per_class: int, noise: float) -> list[tuple[int, int, np.ndarray]]:
    """(class, index, HxWx3 uint8) images: a class colour plus noise, odd sizes so resize and crop do real work."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(CLASSNAMES)):
        for i in range(per_class):
            base = np.array([60 + 80 * c, 200 - 70 * c, 40 + 50 * ((c + i) % 3)], dtype=np.float64)
            img = np.clip(base + rng.normal(0, noise, size=(37 + i % 6, 41, 3)), 0, 255).astype(np.uint8)
            out.append((c, i, img))
    return out


def _write_images(root: Path, seed: int, noise: float) -> None:
    for name in CLASSNAMES:
        (root / name).mkdir(parents=True)
    for c, i, img in _images(seed, PER_CLASS, noise):
        Image.fromarray(img).save(root / CLASSNAMES[c] / f"{i:02d}.png")


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: threads only add spinning


class _StockClassifier(nn.Module):
    """The stock open_clip image tower and a linear head: normalize(encode_image(x)) @ W.T + b, with the head
    built by open_clip's own zero-shot helper (the package's CLIPClassifier is not used for expected values)."""

    def __init__(self, clip: nn.Module, tokenizer) -> None:
        super().__init__()
        self.visual = copy.deepcopy(clip.visual)
        text = open_clip.build_zero_shot_classifier(
            clip,
            tokenizer,
            CLASSNAMES,
            open_clip.SIMPLE_IMAGENET_TEMPLATES,
            num_classes_per_batch=10,
            device="cpu",
            use_tqdm=False,
        )  # [D, C]
        self.head = nn.Linear(text.shape[0], text.shape[1])
        with torch.no_grad():
            self.head.weight.copy_(clip.logit_scale.exp() * text.T)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(x), dim=-1))


def _build(tmp: Path, arch: str, tiny: str, n_sets: int, train_steps: int, train_lr: float) -> dict:
    cfg_path = tmp / f"{arch}.json"
    cfg_path.write_text(json.dumps(TINY_MODEL_CONFIGS[tiny]))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    # BatchNorm statistics from images, as pretraining would leave them (the ResNet tower's random-init
    # statistics collapse its features to one point); the ViT tower has none.
    calib = torch.stack([preprocess(Image.fromarray(img)) for _, _, img in _images(98, 8, 60.0)])
    clip.visual.train()
    with torch.no_grad():
        for _ in range(10):
            clip.visual(calib)
    clip.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    # Zero-shot checkpoint: a whole CLIP state dict (the command builds the head from the text tower).
    zs_path = save_state_dict(tmp / "zs.safetensors", clip.state_dict())
    stock = _StockClassifier(clip, tokenizer).eval()
    theta_zs = {k: v.detach().clone() for k, v in stock.state_dict().items()}
    # Fine-tuned checkpoint: the zero-shot classifier trained a few Adam steps on clean images, saved in the
    # classifier layout (visual.*, head.*) as a weights-only torch file.
    train = _images(99, 8, TRAIN_NOISE)
    xt = torch.stack([preprocess(Image.fromarray(img)) for _, _, img in train])
    yt = torch.tensor([c for c, _, _ in train])
    # Train mode: BatchNorm's running statistics follow the training images (the ResNet tower's random-init
    # statistics collapse its features to one point in eval mode).
    ft_model = copy.deepcopy(stock).train()
    opt = torch.optim.Adam(ft_model.parameters(), lr=train_lr)
    for _ in range(train_steps):
        opt.zero_grad()
        F.cross_entropy(ft_model(xt), yt).backward()
        opt.step()
    theta_ft = {k: v.detach().clone() for k, v in ft_model.state_dict().items()}
    ft_path = tmp / "ft.pt"
    torch.save(theta_ft, ft_path)
    sets = [tmp / name for name in ("set_a", "set_b")[:n_sets]]
    for i, s in enumerate(sets):
        _write_images(s, seed=10 + i, noise=SET_NOISE[s.name])
    return {
        "arch": arch,
        "tmp": tmp,
        "cfg": cfg_path,
        "zs": zs_path,
        "ft": ft_path,
        "sets": sets,
        "stock": stock,
        "theta_zs": theta_zs,
        "theta_ft": theta_ft,
        "preprocess": preprocess,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("eval"), ARCH, "dawin-tiny-vit", n_sets=2, train_steps=4, train_lr=3e-3)


@pytest.fixture(scope="module")
def setup_rn(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("eval_rn"), ARCH_RN, "dawin-tiny-rn", n_sets=1, train_steps=20, train_lr=1e-2)


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


def _merge(alpha: float, zs: dict, ft: dict) -> dict:
    return {k: (1 - alpha) * zs[k] + alpha * ft[k] if zs[k].is_floating_point() else zs[k] for k in zs}


def _entropy(z: torch.Tensor) -> torch.Tensor:
    return -(F.softmax(z, 1) * F.log_softmax(z, 1)).sum(1)


@torch.no_grad()
def _expected(setup, root: Path) -> dict[str, torch.Tensor]:
    """Per-sample outputs of every method (logits; probabilities for the ensemble) and the labels ("y")."""
    from dawin_ext.testing.reference_methods import adawise_reference, beta_mixture_reference

    if root in _expected_cache:
        return _expected_cache[root]
    x, y = _load_set(root, setup["preprocess"])
    zs, ft = setup["theta_zs"], setup["theta_ft"]
    model = copy.deepcopy(setup["stock"]).eval()

    def logits(sd, inputs=x):
        model.load_state_dict(sd)
        return model(inputs)

    lz, lf = logits(zs), logits(ft)
    lam = torch.exp(-_entropy(lf)) / (torch.exp(-_entropy(lz)) + torch.exp(-_entropy(lf)))  # weight on ft
    mix = beta_mixture_reference(lam.double().numpy(), n_mixtures=3, seed=SEED)
    labels, means = mix["labels"], mix["means"]
    assert len(np.unique(labels)) > 1, "the test needs more than one cluster"
    cluster = torch.empty_like(lz)
    for start in range(0, len(x), BATCH):  # the reference loop: per batch, one merge per cluster present
        idx = np.arange(start, min(start + BATCH, len(x)))
        for j in np.unique(labels[idx]):
            sub = torch.from_numpy(idx[labels[idx] == j])
            cluster[sub] = logits(_merge(float(means[j]), zs, ft), x[sub])
    exact = torch.cat([logits(_merge(float(lam[i]), zs, ft), x[i : i + 1]) for i in range(len(x))])
    out = {
        "y": y,
        "zeroshot": lz,
        "finetuned": lf,
        "wise-ft": logits(_merge(ALPHA, zs, ft)),
        "ensemble": (1 - ALPHA) * F.softmax(lz, 1) + ALPHA * F.softmax(lf, 1),
        "dawin-cluster": cluster,
        "dawin-exact": exact,
    }
    if setup["arch"] == ARCH:
        batches = list(x.split(BATCH))
        _, ada = adawise_reference(
            setup["stock"], zs, ft, batches, n_evals=ADAWISE_EVALS, n_init=min(3, ADAWISE_EVALS), seed=SEED
        )
        out["adawise"] = torch.cat(ada)
    _expected_cache[root] = out
    return out


class _Scored(float):
    """An accuracy that remembers the per-sample scores it was computed from."""

    scores: torch.Tensor


@pytest.fixture
def per_sample(monkeypatch) -> dict:
    """The command's per-sample scores, keyed by the method name and set name the command reports them under.

    ``evaluate._accuracy`` is wrapped to return a float carrying its scores, and ``evaluate._print_table``
    to keep the results table it is given, so nothing is matched by call order.
    """
    captured: dict = {}
    accuracy, print_table = evaluate._accuracy, evaluate._print_table

    def scored_accuracy(scores, labels):
        acc = _Scored(accuracy(scores, labels))
        acc.scores = scores.detach().clone()
        return acc

    def keep_table(results, set_names, skipped):
        captured.update({m: dict(accs) for m, accs in results.items()})
        return print_table(results, set_names, skipped)

    monkeypatch.setattr(evaluate, "_accuracy", scored_accuracy)
    monkeypatch.setattr(evaluate, "_print_table", keep_table)
    return captured


def _assert_matches_expected(captured: dict, results_json: dict, expected: dict, methods, set_name: str) -> None:
    for m in methods:
        got = captured[m][set_name]
        assert isinstance(got, _Scored), f"{m}: no per-sample scores recorded"
        torch.testing.assert_close(
            got.scores, expected[m], rtol=0, atol=ATOL, msg=lambda e, m=m: f"{m} on {set_name}: {e}"
        )
        assert float(got) == pytest.approx(_acc(expected[m], expected["y"]), abs=1e-12), (m, set_name)
        assert results_json[m][set_name] == pytest.approx(float(got), abs=1e-12), (m, set_name)


def _assert_methods_differ(expected_per_set: list[dict], methods, predictions: bool = True) -> None:
    """Over the test sets, the expected outputs of any two methods differ far beyond the tolerance, so a swap
    cannot pass; with ``predictions``, every pair except (zero-shot, output ensemble) also differs in at least one
    predicted class."""
    expected = {m: torch.cat([e[m] for e in expected_per_set]) for m in methods}
    for a, b in itertools.combinations(methods, 2):
        gap = float((expected[a] - expected[b]).abs().max())
        assert gap > 100 * ATOL, f"{a} and {b} give nearly the same outputs (max diff {gap:.2e})"
        if predictions and {a, b} != {"zeroshot", "ensemble"}:  # the ensemble leans 70% on the zero-shot model
            differ = int((expected[a].argmax(1) != expected[b].argmax(1)).sum())
            assert differ > 0, f"{a} and {b} predict the same class on every sample"


def test_eval_all_methods_match_plain_computation(setup, capsys, per_sample):
    out_json = setup["tmp"] / "results.json"
    rc = cli.main(_args(setup, "--alpha", str(ALPHA), "--adawise-evals", str(ADAWISE_EVALS), "--json", str(out_json)))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    results = json.loads(out_json.read_text())
    assert results["skipped"] == {}
    assert list(results["accuracy"]) == ALL_METHODS
    _assert_methods_differ([_expected(setup, root) for root in setup["sets"]], ALL_METHODS)
    for root in setup["sets"]:
        expected = _expected(setup, root)
        _assert_matches_expected(per_sample, results["accuracy"], expected, ALL_METHODS, root.name)
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
    rc = cli.main(_args(setup_rn, "--alpha", str(ALPHA), "--methods", *methods, "--json", str(out_json)))
    assert rc == 0, capsys.readouterr().err
    got = json.loads(out_json.read_text())["accuracy"]
    root = setup_rn["sets"][0]
    expected = _expected(setup_rn, root)
    # The ResNet tower's zero-shot head predicts one class at random init, so only the outputs (not the
    # predicted classes) are required to differ here; the ViT test above covers differing predictions.
    _assert_methods_differ([expected], methods, predictions=False)
    _assert_matches_expected(per_sample, got, expected, methods, root.name)


def test_eval_subprocess_and_progress(setup):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "dawin_ext.cli",
        *_args(setup, "--alpha", str(ALPHA), "--methods", "zeroshot", "finetuned", "ensemble"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["method", "zeroshot", "finetuned", "ensemble"]
    assert "zero-shot + fine-tuned logits" in proc.stderr  # the tqdm bar
    for ln in lines[1:]:
        m = ln.split()[0]
        expected = [_acc(_expected(setup, r)[m], _expected(setup, r)["y"]) for r in setup["sets"]]
        got = [float(v) for v in ln.split()[1:3]]
        assert got == pytest.approx([100 * e for e in expected], abs=0.006), m


def test_saved_module_checkpoint_needs_trust(setup, capsys):
    module_path = setup["tmp"] / "ft_module.pt"
    stock = setup["stock"]  # a whole module of the package's classifier class, as users save it
    ft_module = CLIPClassifier(copy.deepcopy(stock.visual), stock.head.weight.detach(), stock.head.bias.detach())
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
    expected = {r.name: _acc(_expected(setup, r)["finetuned"], _expected(setup, r)["y"]) for r in setup["sets"]}
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
        (broken / name / "ok.png").write_bytes((setup["sets"][0] / name / "00.png").read_bytes())
    (broken / "kite" / "bad.png").write_bytes(b"\x89PNG not really")
    rc = cli.main(_args(setup, "--methods", "zeroshot", data=[broken]))
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot read image" in err and "bad.png" in err


def test_unavailable_methods_are_skipped_or_refused(setup, capsys, monkeypatch):
    from dawin_ext.cli import eval as evaluate

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
