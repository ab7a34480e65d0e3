"""What the ``dawin-ext eval`` tests share: generated ImageFolder sets, tiny checkpoints, the command line, and every
method's per-sample outputs recomputed without the package's accelerated code.

Used by tests/cli/test_cli_eval.py (open_clip), tests/cli/test_cli_eval_hf.py (Hugging Face CLIP),
tests/methods/test_distributed.py (the command under torchrun) and tests/integrations/test_fusion_bench.py (the images
and the tiny HF CLIP). Importable as ``eval_setup`` because pytest puts tests/ (conftest.py's folder) on sys.path.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dawin_ext.cli import eval as evaluate
from dawin_ext.integrations.checkpoints import save_state_dict
from dawin_ext.integrations.openclip import TINY_MODEL_CONFIGS, register_tiny_configs

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


def images(seed: int, per_class: int, noise: float) -> list[tuple[int, int, np.ndarray]]:
    """(class, index, HxWx3 uint8) images: a class colour plus noise, odd sizes so resize and crop do real work."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(CLASSNAMES)):
        for i in range(per_class):
            base = np.array([60 + 80 * c, 200 - 70 * c, 40 + 50 * ((c + i) % 3)], dtype=np.float64)
            img = np.clip(base + rng.normal(0, noise, size=(37 + i % 6, 41, 3)), 0, 255).astype(np.uint8)
            out.append((c, i, img))
    return out


def image_batch(preprocess, seed: int, per_class: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`images` through ``preprocess``, stacked: (x [N, 3, H, W], class labels [N])."""
    items = images(seed, per_class, noise)
    return torch.stack([preprocess(Image.fromarray(img)) for _, _, img in items]), torch.tensor(
        [c for c, _, _ in items]
    )


def write_images(root: Path, seed: int, noise: float) -> None:
    for name in CLASSNAMES:
        (root / name).mkdir(parents=True)
    for c, i, img in images(seed, PER_CLASS, noise):
        Image.fromarray(img).save(root / CLASSNAMES[c] / f"{i:02d}.png")


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


def write_test_sets(tmp: Path, n_sets: int = 2) -> list[Path]:
    """The first ``n_sets`` of the test sets (set_a, set_b) as image folders under ``tmp``, each with its noise."""
    sets = [tmp / name for name in ("set_a", "set_b")[:n_sets]]
    for i, s in enumerate(sets):
        write_images(s, seed=10 + i, noise=SET_NOISE[s.name])
    return sets


def run_eval_all_methods(argv: list[str], out_json: Path, capsys) -> tuple[dict, pytest.CaptureResult]:
    """Runs the eval command (``argv`` from an ``eval_args``) with every method at :data:`ALPHA` and
    :data:`ADAWISE_EVALS`, writing ``out_json``; asserts exit status 0, nothing skipped and every method reported,
    and returns the JSON results and the captured output."""
    from dawin_ext import cli

    rc = cli.main([*argv, "--alpha", str(ALPHA), "--adawise-evals", str(ADAWISE_EVALS), "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    results = json.loads(out_json.read_text())
    assert results["skipped"] == {}
    assert list(results["accuracy"]) == ALL_METHODS
    return results, captured


def build_setup(tmp: Path, arch: str, tiny: str, n_sets: int, train_steps: int, train_lr: float) -> dict:
    cfg_path = tmp / f"{arch}.json"
    cfg_path.write_text(json.dumps(TINY_MODEL_CONFIGS[tiny]))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    # BatchNorm statistics from images, as pretraining would leave them (the ResNet tower's random-init
    # statistics collapse its features to one point); the ViT tower has none.
    calib, _ = image_batch(preprocess, 98, 8, 60.0)
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
    xt, yt = image_batch(preprocess, 99, 8, TRAIN_NOISE)
    # Train mode: BatchNorm's running statistics follow the training images (the ResNet tower's random-init
    # statistics collapse its features to one point in eval mode).
    ft_model = copy.deepcopy(stock).train()
    train_adam(ft_model, ft_model.parameters(), xt, yt, train_steps, train_lr)
    theta_ft = {k: v.detach().clone() for k, v in ft_model.state_dict().items()}
    ft_path = tmp / "ft.pt"
    torch.save(theta_ft, ft_path)
    sets = write_test_sets(tmp, n_sets)
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


def eval_args(setup, *extra: str, data=None, zs=None, ft=None, classnames=None) -> list[str]:
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


def load_set(root: Path, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in ImageFolder's order (folders, then files, sorted), labelled by position in CLASSNAMES."""
    xs, ys = [], []
    for name in sorted(CLASSNAMES):
        for f in sorted((root / name).iterdir()):
            xs.append(preprocess(Image.open(f).convert("RGB")))
            ys.append(CLASSNAMES.index(name))
    return torch.stack(xs), torch.tensor(ys)


def accuracy_of(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(1) == y).double().mean())


def _merge(alpha: float, zs: dict, ft: dict) -> dict:
    return {k: (1 - alpha) * zs[k] + alpha * ft[k] if zs[k].is_floating_point() else zs[k] for k in zs}


def _entropy(z: torch.Tensor) -> torch.Tensor:
    return -(F.softmax(z, 1) * F.log_softmax(z, 1)).sum(1)


@torch.no_grad()
def expected_outputs(setup, root: Path) -> dict[str, torch.Tensor]:
    """Per-sample outputs of every method (logits; probabilities for the ensemble) and the labels ("y")."""
    from dawin_ext.testing.reference_methods import (
        adawise_reference,
        beta_mixture_reference,
        dawin_cluster_loop_reference,
    )

    if root in _expected_cache:
        return _expected_cache[root]
    x, y = load_set(root, setup["preprocess"])
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
    # The reference loop: per batch of the command's size, one merge per cluster present.
    cluster = dawin_cluster_loop_reference(model, zs, ft, list(x.split(BATCH)), labels, means)
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


def capture_per_sample(monkeypatch) -> dict:
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


def assert_matches_expected(captured: dict, results_json: dict, expected: dict, methods, set_name: str) -> None:
    for m in methods:
        got = captured[m][set_name]
        assert isinstance(got, _Scored), f"{m}: no per-sample scores recorded"
        torch.testing.assert_close(
            got.scores, expected[m], rtol=0, atol=ATOL, msg=lambda e, m=m: f"{m} on {set_name}: {e}"
        )
        assert float(got) == pytest.approx(accuracy_of(expected[m], expected["y"]), abs=1e-12), (m, set_name)
        assert results_json[m][set_name] == pytest.approx(float(got), abs=1e-12), (m, set_name)


def assert_methods_differ(expected_per_set: list[dict], methods, predictions: bool = True) -> None:
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


def tiny_hf_clip(seed: int):
    """A random-init Hugging Face ``CLIPModel`` with the tiny open_clip ViT's configuration, in eval mode."""
    import transformers

    from dawin_ext.integrations import hf_clip

    register_tiny_configs()
    cfg = hf_clip.hf_config_from_open_clip(open_clip.get_model_config("dawin-tiny-vit"), quick_gelu=False)
    torch.manual_seed(seed)
    return transformers.CLIPModel(cfg).eval()


def vision_tower(model: nn.Module) -> nn.Module:
    """The ``CLIPVisionTransformer`` of a ``CLIPModel`` or ``CLIPVisionModel`` (their state dicts differ by prefix)."""
    return getattr(model, "vision_model", model)


def train_adam(model: nn.Module, params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    """A few Adam steps of cross-entropy on (x, y): how the tests make a 'fine-tuned' checkpoint."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
