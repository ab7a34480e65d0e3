"""``dawin-ext eval``: accuracy of every interpolation method on ImageFolder test sets, for open_clip checkpoints.

Example::

    dawin-ext eval --model ViT-B-32 --pretrained-config openai \\
        --zeroshot zs.safetensors --finetuned ft.safetensors \\
        --classnames classnames.txt --data /data/imagenet/val /data/imagenetv2 /data/imagenet-sketch

The two checkpoints are loaded safely (safetensors or ``torch.load(weights_only=True)``; see
:mod:`dawin_ext.checkpoints`), turned into :class:`~dawin_ext.openclip.CLIPClassifier` state dicts (a checkpoint
without a head gets the zero-shot head built from ``--classnames`` and ``--templates``) and checked against each
other before any image is read. Every test set must have one folder per class; folders named like the classes are
matched by name, others are taken in sorted order. The open_clip model is created with ``pretrained=None`` and never
downloads anything.

Per test set, DaWin fits its Beta mixture on that set's own coefficients (the reference's offline setting), and
AdaWiSE chooses one alpha per batch, so its result depends on ``--batch-size``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["METHODS", "add_arguments", "run", "parse_classnames", "EvalError"]

#: Method name -> description, in table order.
METHODS: dict[str, str] = {
    "zeroshot": "zero-shot model",
    "finetuned": "fine-tuned model",
    "wise-ft": "WiSE-FT, (1-alpha)*theta_zs + alpha*theta_ft",
    "ensemble": "output ensemble, (1-alpha)*p_zs + alpha*p_ft",
    "dawin-cluster": "DaWin, Beta-mixture cluster-wise merging (K=--components)",
    "dawin-exact": "DaWin, exact per-sample interpolation",
    "adawise": "AdaWiSE, per-batch Bayesian optimisation of alpha",
}


class EvalError(ValueError):
    """Bad command-line input, reported as ``dawin-ext eval: error: ...`` with exit status 2."""


class MethodError(RuntimeError):
    """A method refused the data while running (e.g. NaN logits); reported with exit status 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``dawin-ext eval`` options to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "methods:\n" + "\n".join(f"  {k:<14} {v}" for k, v in METHODS.items())
    parser.add_argument("--model", required=True, metavar="ARCH", help="open_clip architecture, e.g. ViT-B-32")
    parser.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="JSON",
        help="register an open_clip architecture config file (its stem is the name to pass to --model); repeatable",
    )
    parser.add_argument(
        "--pretrained-config",
        metavar="TAG",
        help="open_clip pretrained tag whose metadata (QuickGELU, image mean/std, interpolation) matches the "
        "checkpoints, e.g. 'openai'; nothing is downloaded",
    )
    parser.add_argument("--zeroshot", required=True, metavar="ZS", help="zero-shot checkpoint (.safetensors or torch)")
    parser.add_argument("--finetuned", required=True, metavar="FT", help="fine-tuned checkpoint")
    parser.add_argument(
        "--classnames",
        required=True,
        metavar="FILE|a,b,c",
        help="class names in label order: a text file (one per line), a JSON list, or a comma-separated list",
    )
    parser.add_argument(
        "--templates",
        default="openai",
        metavar="SET|FILE",
        help="prompt templates for heads built from text: 'openai' (80), 'simple' (2), 'classname', or a file "
        "with one '{}' template per line (default: openai)",
    )
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR", help="ImageFolder-layout test sets")
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"methods to run (default: all available): {', '.join(METHODS)}",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="WiSE-FT / output-ensemble weight on FT (0.5)")
    parser.add_argument("--components", type=int, default=3, help="DaWin Beta-mixture components K (3)")
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs=2,
        default=(1.0, 1.0),
        metavar=("T_ZS", "T_FT"),
        help="DaWin entropy temperatures (default 1 1; the reference uses 0.9576 0.9733 for its ViT-B/32)",
    )
    parser.add_argument("--offset-adjustment", action="store_true", help="DaWin's per-dataset offset adjustment")
    parser.add_argument("--seed", type=int, default=1, help="seed of DaWin's mixture and AdaWiSE's GP (1)")
    parser.add_argument("--adawise-evals", type=int, default=8, help="AdaWiSE forward passes per batch (8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow checkpoints that are pickles needing arbitrary code (e.g. torch.save(model)); this RUNS "
        "CODE FROM THE FILE: use only for files whose origin you trust",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")


# ----------------------------------------------------------------------------------------------------- validation
def parse_classnames(spec: str) -> list[str]:
    """Class names from a file (one per line, or a JSON list if it ends in .json) or a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                names = json.loads(text)
            except json.JSONDecodeError as e:
                raise EvalError(f"--classnames {spec!r} is not valid JSON: {e}") from e
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise EvalError(f"--classnames {spec!r} must hold a JSON list of strings")
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    elif "," in spec:
        names = [n.strip() for n in spec.split(",")]
    else:
        raise EvalError(f"--classnames {spec!r} is neither an existing file nor a comma-separated list")
    names = [n.strip() for n in names]
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise EvalError(f"--classnames: class name {empty[0]} is empty")
    if len(names) < 2:
        raise EvalError(f"--classnames: need at least 2 classes, got {len(names)}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise EvalError(f"--classnames: {n!r} appears twice (positions {seen[n]} and {i})")
        seen[n] = i
    return names


def _check_device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise EvalError(f"--device {spec!r} is not a device: {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {spec}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvalError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise EvalError(f"--device {spec!r}: only cpu and cuda are supported")
    return device


def _method_available(name: str) -> str | None:
    """None if ``name`` can run, else why not (an import that failed)."""
    try:
        if name in ("dawin-cluster", "dawin-exact"):
            from .dawin import DaWin  # noqa: F401
        if name == "dawin-exact":
            from .samplewise import SampleWiseInterpolator  # noqa: F401
        if name == "adawise":
            from .adawise import AdaWiSE  # noqa: F401
        if name in ("wise-ft", "ensemble"):
            from .wise_ft import output_ensemble, wise_ft  # noqa: F401
    except ImportError as e:
        return f"not available in this installation ({e})"
    return None


def _select_methods(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Methods to run, and the skipped ones with their reason. Explicitly requested but unavailable: error."""
    if requested:
        unknown = [m for m in requested if m not in METHODS]
        if unknown:
            raise EvalError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        dup = [m for i, m in enumerate(requested) if m in requested[:i]]
        if dup:
            raise EvalError(f"--methods: {dup[0]!r} given twice")
        for m in requested:
            why = _method_available(m)
            if why:
                raise EvalError(f"--methods: {m} is {why}")
        return list(requested), {}
    chosen, skipped = [], {}
    for m in METHODS:
        why = _method_available(m)
        if why:
            skipped[m] = why
        else:
            chosen.append(m)
    return chosen, skipped


@dataclass
class _TestSet:
    name: str
    root: Path
    dataset: object
    note: str = ""


def _load_image(path: str):
    """ImageFolder's loader, with an error that names the file (a corrupt image is found only when read)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as e:
        raise EvalError(f"cannot read image {path!r}: {e}") from e


def _open_test_sets(dirs: list[str], classnames: list[str]) -> list[_TestSet]:
    """Scans the ImageFolder layouts (no image is decoded); the transform is set once the model exists."""
    from torchvision.datasets import ImageFolder

    sets = []
    names_used: dict[str, int] = {}
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise EvalError(f"--data {d!r} is not a directory")
        try:
            ds = ImageFolder(str(root), loader=_load_image)
        except (FileNotFoundError, RuntimeError) as e:
            raise EvalError(
                f"--data {d!r} is not an ImageFolder layout (one sub-folder of images per class): {e}"
            ) from e
        folders = list(ds.classes)
        if len(folders) != len(classnames):
            raise EvalError(
                f"--data {d!r} has {len(folders)} class folders but --classnames gives {len(classnames)} classes"
            )
        note = ""
        if set(folders) == set(classnames) and folders != classnames:
            # Folder names are the class names in another order: map labels by name, not by sorted position.
            order = {n: i for i, n in enumerate(classnames)}
            mapping = {ds.class_to_idx[n]: order[n] for n in folders}
            ds.target_transform = mapping.__getitem__
            note = "labels matched to class names by folder name"
        elif set(folders) != set(classnames):
            note = "class folders taken in sorted order as the class names' order"
        name = root.name or str(root)
        if name in names_used:
            names_used[name] += 1
            name = f"{name}#{names_used[name]}"
        else:
            names_used[name] = 1
        sets.append(_TestSet(name=name, root=root, dataset=ds, note=note))
    return sets


# ----------------------------------------------------------------------------------------------------- evaluation
def _progress(iterable: Iterable, desc: str, enabled: bool, total: int | None = None) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


def _accuracy(scores: Tensor, labels: Tensor) -> float:
    if scores.shape[0] != labels.shape[0]:
        raise RuntimeError(f"{scores.shape[0]} predictions for {labels.shape[0]} labels")
    return float((scores.argmax(dim=1).cpu() == labels.cpu()).double().mean())


@torch.no_grad()
def _run_batches(fn: Callable[[Tensor], Tensor], loader, device, desc: str, progress: bool) -> tuple[Tensor, Tensor]:
    outs, labels = [], []
    for x, y in _progress(loader, desc, progress, total=len(loader)):
        outs.append(fn(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def run(args: argparse.Namespace) -> int:
    """Runs ``dawin-ext eval``; returns the exit status (2 with a message on stderr for bad input)."""
    from .checkpoints import CheckpointFormatError, UnsafeCheckpointError
    from .statedict import IncompatibleStateDictsError

    try:
        return _run(args)
    except (EvalError, IncompatibleStateDictsError, CheckpointFormatError, UnsafeCheckpointError) as e:
        print(f"dawin-ext eval: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # a path that vanished between the checks and its use
        print(f"dawin-ext eval: error: {e}", file=sys.stderr)
        return 2
    except MethodError as e:
        print(f"dawin-ext eval: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from . import openclip as oc
    from .checkpoints import CheckpointFormatError
    from .statedict import IncompatibleStateDictsError

    # Everything about the input is checked before a model is built or an image is read.
    if not (math.isfinite(args.alpha) and 0.0 <= args.alpha <= 1.0):
        raise EvalError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise EvalError(f"--workers must be >= 0, got {args.workers}")
    if args.components < 1:
        raise EvalError(f"--components must be >= 1, got {args.components}")
    if args.adawise_evals < 1:
        raise EvalError(f"--adawise-evals must be >= 1, got {args.adawise_evals}")
    for t in args.temperatures:
        if not (math.isfinite(t) and t > 0):
            raise EvalError(f"--temperatures must be finite and > 0, got {tuple(args.temperatures)}")
    device = _check_device(args.device)
    methods, skipped = _select_methods(args.methods)
    for flag, path in (("--zeroshot", args.zeroshot), ("--finetuned", args.finetuned)):
        if not Path(path).is_file():
            raise EvalError(f"{flag} {path!r} does not exist or is not a file")
    classnames = parse_classnames(args.classnames)
    test_sets = _open_test_sets(args.data, classnames)
    try:
        for cfg in args.model_config:
            oc.register_model_config(cfg)
        pair = oc.load_classifier_pair(
            args.model,
            args.zeroshot,
            args.finetuned,
            classnames,
            args.templates,
            pretrained_config=args.pretrained_config,
            trust_pickle=args.trust_pickle,
            dtype=torch.float32,
            device=device,
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, (IncompatibleStateDictsError, CheckpointFormatError)):
            raise
        raise EvalError(str(e)) from e
    base, theta_zs, theta_ft = pair.model, pair.theta_zs, pair.theta_ft
    for ts in test_sets:
        ts.dataset.transform = pair.preprocess
    progress = not args.no_progress

    print(
        f"dawin-ext eval: {args.model} ({sum(v.numel() for v in theta_zs.values()) / 1e6:.2f}M parameters), "
        f"{len(classnames)} classes, {len(test_sets)} test set(s), device {device}",
        file=sys.stderr,
    )
    for name, why in skipped.items():
        print(f"dawin-ext eval: skipping {name}: {why}", file=sys.stderr)

    results: dict[str, dict[str, float]] = {m: {} for m in methods}
    seconds: dict[str, float] = dict.fromkeys(methods, 0.0)
    for ts in test_sets:
        if ts.note:
            print(f"dawin-ext eval: {ts.name}: {ts.note}", file=sys.stderr)
        loader = torch.utils.data.DataLoader(
            ts.dataset,
            batch_size=args.batch_size,
            shuffle=False,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
        )
        set_results = _evaluate_set(args, methods, base, theta_zs, theta_ft, loader, device, ts.name, progress, seconds)
        for m, acc in set_results.items():
            results[m][ts.name] = acc

    _print_table(results, [ts.name for ts in test_sets], skipped)
    if args.json:
        payload = {
            "model": args.model,
            "classes": len(classnames),
            "test_sets": {ts.name: {"path": str(ts.root), "samples": len(ts.dataset)} for ts in test_sets},
            "accuracy": results,
            "seconds": seconds,
            "skipped": skipped,
            "settings": {
                "alpha": args.alpha,
                "components": args.components,
                "temperatures": list(args.temperatures),
                "offset_adjustment": args.offset_adjustment,
                "seed": args.seed,
                "adawise_evals": args.adawise_evals,
                "batch_size": args.batch_size,
            },
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def dawin_requested(methods) -> bool:
    return "dawin-cluster" in methods or "dawin-exact" in methods


def _shared_logits(args, methods, base, theta_zs, theta_ft, loader, device, tag: str, progress: bool):
    """Both models' logits over the set, once: through DaWin's fit when DaWin runs, else directly."""
    desc = f"{tag} zero-shot + fine-tuned logits"
    if dawin_requested(methods):
        from .dawin import DaWin

        dawin = DaWin(
            base,
            theta_zs,
            theta_ft,
            temperatures=tuple(args.temperatures),
            offset_adjustment=args.offset_adjustment,
            n_clusters=args.components,
            seed=args.seed,
        )
        # fit() runs both models over the set once; its logits also give zero-shot / fine-tuned / ensemble.
        dawin.fit(_progress(loader, desc, progress, len(loader)))
        logits_zs, logits_ft = dawin.logits_
        return logits_zs, logits_ft, dawin.fit_labels_, dawin
    if any(m in methods for m in ("zeroshot", "finetuned", "ensemble")):
        from .models import BlendedModels, collect_logits

        experts = BlendedModels(base, [theta_zs, theta_ft], n_models=2)
        experts.blend([[1.0, 0.0], [0.0, 1.0]])
        (logits_zs, logits_ft), labels = collect_logits(
            experts.models,
            _progress(loader, desc, progress, len(loader)),
            names=["zero-shot model", "fine-tuned model"],
            device=device,
        )
        return logits_zs, logits_ft, labels, None
    return None, None, None, None


def _evaluate_set(
    args, methods, base: nn.Module, theta_zs, theta_ft, loader, device, set_name: str, progress: bool, seconds
) -> dict[str, float]:
    """Accuracy of each method on one test set. Both models' logits are computed once and shared."""
    out: dict[str, float] = {}
    tag = f"[{set_name}]"

    def timed(method: str, fn: Callable[[], float]) -> None:
        start = time.perf_counter()
        try:
            out[method] = fn()
        except ValueError as e:
            raise MethodError(f"{method} on {set_name}: {e}") from e
        seconds[method] += time.perf_counter() - start

    dawin = None
    start = time.perf_counter()
    try:
        logits_zs, logits_ft, labels, dawin = _shared_logits(
            args, methods, base, theta_zs, theta_ft, loader, device, tag, progress
        )
    except ValueError as e:
        stage = "DaWin fit" if dawin_requested(methods) else "zero-shot/fine-tuned logits"
        raise MethodError(f"{stage} on {set_name}: {e}") from e
    shared = time.perf_counter() - start
    for m in ("zeroshot", "finetuned"):
        if m in methods:
            seconds[m] += shared / 2
    if "zeroshot" in methods:
        out["zeroshot"] = _accuracy(logits_zs, labels)
    if "finetuned" in methods:
        out["finetuned"] = _accuracy(logits_ft, labels)
    if "ensemble" in methods:
        from .wise_ft import output_ensemble

        timed("ensemble", lambda: _accuracy(output_ensemble(logits_zs, logits_ft, weight=args.alpha), labels))
    if "wise-ft" in methods:

        def wise() -> float:
            from .wise_ft import wise_ft

            merged = copy.deepcopy(base)
            merged.load_state_dict(wise_ft(theta_zs, theta_ft, args.alpha))
            scores, y = _run_batches(merged, loader, device, f"{tag} WiSE-FT a={args.alpha}", progress)
            return _accuracy(scores, y)

        timed("wise-ft", wise)
    if dawin is not None:
        for m, mode in (("dawin-cluster", "cluster"), ("dawin-exact", "exact")):
            if m in methods:

                def dawin_acc(mode=mode) -> float:
                    scores = dawin.predict_dataset(
                        _progress(loader, f"{tag} DaWin {mode}", progress, len(loader)), mode
                    )
                    return _accuracy(scores, labels)

                timed(m, dawin_acc)
    if "adawise" in methods:
        from .adawise import AdaWiSE

        def adawise() -> float:
            ada = AdaWiSE(
                base, theta_zs, theta_ft, n_evals=args.adawise_evals, n_init=min(3, args.adawise_evals), seed=args.seed
            )
            scores, y = _run_batches(ada.predict, loader, device, f"{tag} AdaWiSE", progress)
            return _accuracy(scores, y)

        timed("adawise", adawise)
    return out


def _print_table(results: dict[str, dict[str, float]], set_names: list[str], skipped: dict[str, str]) -> None:
    cols = [*set_names, "mean"] if len(set_names) > 1 else set_names
    width = max(8, *(len(c) for c in cols))
    label_w = max(14, *(len(m) for m in results))
    print(f"{'method':<{label_w}}  " + "  ".join(f"{c:>{width}}" for c in cols))
    for m, accs in results.items():
        vals = [accs[s] for s in set_names]
        if len(set_names) > 1:
            vals.append(sum(vals) / len(vals))
        print(f"{m:<{label_w}}  " + "  ".join(f"{100 * v:>{width}.2f}" for v in vals))
    for m, why in skipped.items():
        print(f"{m:<{label_w}}  skipped: {why}")
