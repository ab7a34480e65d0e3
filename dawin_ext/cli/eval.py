"""``dawin-ext eval``: accuracy of every interpolation method on ImageFolder test sets, for open_clip or Hugging Face
CLIP checkpoints.

Example::

    dawin-ext eval --model ViT-B-32 --pretrained-config openai \\
        --zeroshot zs.safetensors --finetuned ft.safetensors \\
        --classnames classnames.txt --data /data/imagenet/val /data/imagenetv2 /data/imagenet-sketch

    dawin-ext eval --family hf --zeroshot clip-vit-base-patch32/ --finetuned my-finetuned-clip/ \\
        --classnames classnames.txt --data /data/imagenet/val

With ``--family hf`` the checkpoints are local ``save_pretrained`` directories (safetensors; nothing is downloaded):
the zero-shot one a ``CLIPModel``, the fine-tuned one a ``CLIPModel`` or a ``CLIPVisionModel`` (only the image tower
fine-tuned, as in fusion_bench's pools); see :func:`dawin_ext.integrations.hf_clip.load_hf_classifier_pair`. The tokenizer comes
from the zero-shot directory (or ``--tokenizer``), the image preprocessing from its ``preprocessor_config.json``.

The two checkpoints are loaded safely (safetensors or ``torch.load(weights_only=True)``; see
:mod:`dawin_ext.integrations.checkpoints`), turned into :class:`~dawin_ext.integrations.openclip.CLIPClassifier` state dicts (a checkpoint
without a head gets the zero-shot head built from ``--classnames`` and ``--templates``) and checked against each
other before any image is read. Every test set must have one folder per class; folders named like the classes are
matched by name, others are taken in sorted order. The open_clip model is created with ``pretrained=None`` and never
downloads anything.

Per test set, DaWin fits its Beta mixture on that set's own coefficients (the reference's offline setting), and
AdaWiSE chooses one alpha per batch, so its result depends on ``--batch-size``.

Under ``torchrun --nproc_per_node=N -m dawin_ext.cli eval ...`` every rank evaluates a contiguous shard of each test
set (on batch boundaries: no padding, no duplicates), DaWin's mixture is fitted once over all ranks' coefficients
(:mod:`dawin_ext.methods.distributed`), accuracies are summed (correct, total) counts, and rank 0 alone prints and writes
the results, with ``world_size`` and each set's ``rank_samples``. The ``--json`` file is rewritten atomically after
each test set (``"complete": false`` until the end), and ``--resume`` skips the sets it already holds. AdaWiSE runs
per rank: its warm start restarts at each shard's first batch.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
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
    parser.add_argument(
        "--family",
        choices=("open_clip", "hf"),
        default="open_clip",
        help="checkpoint family: open_clip checkpoint files (default) or Hugging Face CLIP save_pretrained "
        "directories ('hf', needs the hf extra: pip install 'dawin-ext[hf]')",
    )
    parser.add_argument(
        "--model", metavar="ARCH", help="open_clip architecture, e.g. ViT-B-32 (required with --family open_clip)"
    )
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
    parser.add_argument(
        "--zeroshot",
        required=True,
        metavar="ZS",
        help="zero-shot checkpoint (.safetensors or torch); with --family hf a CLIPModel save_pretrained directory",
    )
    parser.add_argument(
        "--finetuned",
        required=True,
        metavar="FT",
        help="fine-tuned checkpoint; with --family hf a CLIPModel or CLIPVisionModel save_pretrained directory",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR|openai",
        help="--family hf: a CLIP tokenizer save_pretrained directory (default: the zero-shot directory), or "
        "'openai' for OpenAI CLIP's tokenizer built offline from the BPE file bundled with open_clip",
    )
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
    parser.add_argument(
        "--json",
        metavar="PATH",
        help='also write the results as JSON (rewritten atomically after each test set; "complete": true at the end)',
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --json: skip the test sets whose results that file already holds (same model and settings)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="under torchrun: a collective that waits longer than S seconds fails the job instead of hanging (1800)",
    )
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
            from ..methods.dawin import DaWin  # noqa: F401
        if name == "dawin-exact":
            from ..exact import SampleWiseInterpolator  # noqa: F401
        if name == "adawise":
            from ..methods.adawise import AdaWiSE  # noqa: F401
        if name in ("wise-ft", "ensemble"):
            from ..methods.wise_ft import output_ensemble, wise_ft  # noqa: F401
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
def _run_batches(fn: Callable[[Tensor], Tensor], loader, device, desc: str, track) -> tuple[Tensor, Tensor]:
    outs, labels = [], []
    for x, y in track(loader, desc):
        outs.append(fn(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


@dataclass
class _Dist:
    """Where this process stands: no group (one process), or rank ``rank`` of ``world`` in ``group``."""

    group: object = None
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, fn: Callable[[], object], what: str):
        """Runs the local step ``fn``; in a group, every rank then learns whether any rank failed (and raises)."""
        from ..methods import distributed as dd

        if self.group is None:
            return fn()
        value, error = dd.capture(fn)
        dd.raise_if_any_failed(error, self.group, what)
        return value


def run(args: argparse.Namespace) -> int:
    """Runs ``dawin-ext eval``; returns the exit status (2 with a message on stderr for bad input).

    Under ``torchrun`` every rank runs this; each prints its own error (prefixed with its rank), so the job's log
    names the rank that failed and why; the healthy ranks fail at the next agreement step, naming that rank.
    """
    from ..integrations.checkpoints import CheckpointFormatError, UnsafeCheckpointError
    from ..methods.distributed import RankFailedError
    from ..ops.statedict import IncompatibleStateDictsError

    prefix = "dawin-ext eval: error: "
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        prefix += f"[rank {os.environ.get('RANK', '?')}] "
    try:
        return _run(args)
    except (EvalError, IncompatibleStateDictsError, CheckpointFormatError, UnsafeCheckpointError) as e:
        print(f"{prefix}{e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # a path that vanished between the checks and its use
        print(f"{prefix}{e}", file=sys.stderr)
        return 2
    except (MethodError, RankFailedError) as e:
        print(f"{prefix}{e}", file=sys.stderr)
        return 1


def _settings(args: argparse.Namespace) -> dict:
    return {
        "alpha": args.alpha,
        "components": args.components,
        "temperatures": list(args.temperatures),
        "offset_adjustment": args.offset_adjustment,
        "seed": args.seed,
        "adawise_evals": args.adawise_evals,
        "batch_size": args.batch_size,
    }


def _read_resume(args: argparse.Namespace, methods: list[str], test_sets: list[_TestSet]) -> dict:
    """The finished test sets of an earlier run's ``--json`` file: {name: {"accuracy": {...}, "entry": {...}}}.

    A set counts as finished when the file holds its accuracy for every method asked for now. A file written with
    other settings or another model is refused (the results would mix two experiments)."""
    path = Path(args.json)
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"--resume: cannot read {args.json!r}: {e}") from e
    if not isinstance(previous, dict) or "accuracy" not in previous or "settings" not in previous:
        raise EvalError(f"--resume: {args.json!r} is not a results file of dawin-ext eval")
    expected = {"model": _model_label(args), "settings": _settings(args)}
    for key, value in expected.items():
        if previous.get(key) != value:
            raise EvalError(
                f"--resume: {args.json!r} was written with {key} {previous.get(key)!r}, this run has {value!r}; "
                "use another --json file or the same settings"
            )
    done = {}
    for ts in test_sets:
        entry = previous.get("test_sets", {}).get(ts.name)
        if not entry or entry.get("path") != str(ts.root):
            continue
        accs = {m: previous["accuracy"].get(m, {}).get(ts.name) for m in methods}
        if all(isinstance(v, float) for v in accs.values()):
            done[ts.name] = {"accuracy": accs, "entry": entry}
    return done


def _run(args: argparse.Namespace) -> int:
    from ..methods import distributed as dd

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
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise EvalError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.resume and not args.json:
        raise EvalError("--resume needs --json PATH: the results file to resume from and to complete")
    for t in args.temperatures:
        if not (math.isfinite(t) and t > 0):
            raise EvalError(f"--temperatures must be finite and > 0, got {tuple(args.temperatures)}")
    device = _check_device(args.device)
    methods, skipped = _select_methods(args.methods)
    _check_family_args(args)
    classnames = parse_classnames(args.classnames)
    test_sets = _open_test_sets(args.data, classnames)
    # Under torchrun: join the process group (gloo on the CPU, NCCL on cuda:LOCAL_RANK).
    group, device, created = dd.init_from_env(device, args.dist_timeout)
    try:
        return _run_sets(args, methods, skipped, classnames, test_sets, device, _Dist(group, *dd.rank_and_world(group)))
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _run_sets(args, methods, skipped, classnames, test_sets, device, dist: _Dist) -> int:
    from ..methods import distributed as dd

    enabled = not args.no_progress

    def log(msg: str) -> None:
        if dist.main:
            print(f"dawin-ext eval: {msg}", file=sys.stderr)

    loader_fn = _load_hf if args.family == "hf" else _load_open_clip
    base, theta_zs, theta_ft, preprocess, notes = loader_fn(args, classnames, device)
    for ts in test_sets:
        ts.dataset.transform = preprocess
    for note in notes:
        log(note)

    ranks = f", {dist.world} ranks ({torch.distributed.get_backend(dist.group)})" if dist.group is not None else ""
    log(
        f"{_model_label(args)} ({sum(v.numel() for v in theta_zs.values()) / 1e6:.2f}M parameters), "
        f"{len(classnames)} classes, {len(test_sets)} test set(s), device {device}{ranks}"
    )
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")

    # --resume: rank 0 reads the earlier results (the file may exist on its node only) and tells every rank.
    done: dict = {}
    if args.resume:
        read = lambda: _read_resume(args, methods, test_sets)  # noqa: E731
        done = read() if dist.group is None else dd.run_on_rank0(read, dist.group, "--resume")
    previous_seconds: dict[str, float] = {}
    if done and dist.main:
        previous_seconds = json.loads(Path(args.json).read_text(encoding="utf-8")).get("seconds", {})

    results: dict[str, dict[str, float]] = {m: {} for m in methods}
    seconds: dict[str, float] = {m: float(previous_seconds.get(m, 0.0)) for m in methods}
    entries: dict[str, dict] = {}

    def write_json(complete: bool) -> None:
        if not (args.json and dist.main):
            return
        payload = {
            "model": _model_label(args),
            "classes": len(classnames),
            "test_sets": entries,
            "accuracy": results,
            "seconds": seconds,
            "skipped": skipped,
            "settings": _settings(args),
            "world_size": dist.world,
            "complete": complete,
        }
        # Atomic: a run killed while writing leaves the previous complete file, never half of one.
        dd.atomic_write_text(args.json, json.dumps(payload, indent=2))

    for ts in test_sets:
        if ts.name in done:
            log(f"{ts.name}: complete in {args.json}, skipped (--resume)")
            for m, acc in done[ts.name]["accuracy"].items():
                results[m][ts.name] = acc
            entries[ts.name] = done[ts.name]["entry"]
            continue
        if ts.note:
            log(f"{ts.name}: {ts.note}")
        sampler = None
        if dist.group is not None:
            # Contiguous shards on batch boundaries: every rank sees the batches one process would see.
            sampler = dd.ShardSampler(len(ts.dataset), rank=dist.rank, world_size=dist.world, block=args.batch_size)
        loader = torch.utils.data.DataLoader(
            ts.dataset,
            batch_size=args.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
        )
        n_total = len(ts.dataset)

        track = _tracker(dist, enabled, len(loader), n_total)
        set_results, rank_samples = _evaluate_set(
            args, methods, base, theta_zs, theta_ft, loader, device, ts.name, track, seconds, dist
        )
        for m, acc in set_results.items():
            results[m][ts.name] = acc
        entries[ts.name] = {"path": str(ts.root), "samples": n_total, "rank_samples": rank_samples}
        write_json(complete=False)

    # Test sets in command-line order, whether resumed or computed.
    entries = {ts.name: entries[ts.name] for ts in test_sets}
    results = {m: {ts.name: results[m][ts.name] for ts in test_sets} for m in methods}
    write_json(complete=True)
    if dist.main:
        _print_table(results, [ts.name for ts in test_sets], skipped)
    return 0


def _model_label(args: argparse.Namespace) -> str:
    """The model as results files name it: the open_clip architecture, or ``hf:<zero-shot directory>``."""
    if args.family == "hf":
        return f"hf:{Path(args.zeroshot).resolve()}"
    return args.model


# Options that only one family reads: given with the other, they are refused (they would be silently ignored).
_OPEN_CLIP_ONLY = (
    ("model", "--model"),
    ("model_config", "--model-config"),
    ("pretrained_config", "--pretrained-config"),
)


def _check_family_args(args: argparse.Namespace) -> None:
    """Checks the checkpoint paths and the family-specific options before anything is loaded."""
    if args.family == "hf":
        for attr, flag in (*_OPEN_CLIP_ONLY, ("trust_pickle", "--trust-pickle")):
            if getattr(args, attr):
                raise EvalError(
                    f"{flag} is for --family open_clip; a Hugging Face directory's config.json gives the architecture"
                    + (" (and its weights are safetensors only)" if attr == "trust_pickle" else "")
                )
        if importlib.util.find_spec("transformers") is None:
            raise EvalError(
                "--family hf needs the 'transformers' package, which is not installed; install the extra: "
                "pip install 'dawin-ext[hf]'"
            )
        for flag, path in (("--zeroshot", args.zeroshot), ("--finetuned", args.finetuned)):
            if not Path(path).is_dir():
                raise EvalError(
                    f"{flag} {path!r} is not a directory; with --family hf pass a save_pretrained directory"
                )
        return
    if not args.model:
        raise EvalError("--model ARCH is required with --family open_clip (e.g. --model ViT-B-32)")
    if args.tokenizer:
        raise EvalError("--tokenizer is for --family hf; open_clip's tokenizer follows --model")
    for flag, path in (("--zeroshot", args.zeroshot), ("--finetuned", args.finetuned)):
        if not Path(path).is_file():
            raise EvalError(f"{flag} {path!r} does not exist or is not a file")


def _load_open_clip(args: argparse.Namespace, classnames: list[str], device: torch.device):
    """(base module, theta_zs, theta_ft, image transform, notes) of two open_clip checkpoints."""
    from ..integrations import openclip as oc
    from ..integrations.checkpoints import CheckpointFormatError
    from ..ops.statedict import IncompatibleStateDictsError

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
    return pair.model, pair.theta_zs, pair.theta_ft, pair.preprocess, []


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _load_hf(args: argparse.Namespace, classnames: list[str], device: torch.device):
    """(base module, theta_zs, theta_ft, image transform, notes) of two Hugging Face CLIP directories."""
    import tempfile

    from ..integrations import hf_clip
    from ..ops.statedict import IncompatibleStateDictsError

    notes = []
    try:
        if args.tokenizer == "openai":
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer = hf_clip.clip_tokenizer_from_open_clip(tmp)
        else:
            tok_dir = Path(args.tokenizer or args.zeroshot)
            if not any((tok_dir / f).is_file() for f in _TOKENIZER_FILES):
                where = "--tokenizer" if args.tokenizer else "the zero-shot directory"
                raise EvalError(
                    f"{where} {str(tok_dir)!r} holds no CLIP tokenizer ({' or '.join(_TOKENIZER_FILES)}); save one "
                    "there with tokenizer.save_pretrained(dir), pass --tokenizer DIR, or --tokenizer openai for "
                    "OpenAI CLIP's tokenizer (the released ViT-B/32, B/16 and L/14 use it)"
                )
            tokenizer = hf_clip.load_hf_tokenizer(tok_dir)
        pair = hf_clip.load_hf_classifier_pair(
            args.zeroshot, args.finetuned, classnames, args.templates, tokenizer=tokenizer, device=device
        )
        image_size = int(pair.model.vision_model.config.image_size)
        preprocess, note = hf_clip.hf_image_transform(args.zeroshot, image_size)
    except (TypeError, ValueError, OSError) as e:
        if isinstance(e, (IncompatibleStateDictsError, EvalError)):
            raise
        raise EvalError(str(e)) from e
    if note:
        notes.append(note)
    return pair.model, pair.theta_zs, pair.theta_ft, preprocess, notes


def _tracker(dist: _Dist, enabled: bool, n_batches: int, n_samples: int) -> Callable[[Iterable, str], Iterable]:
    """``track(loader, desc)``: a tqdm bar over batches in one process; in a group, one bar on rank 0 counting
    the samples of all ranks (every rank must call it the same number of times, in the same order)."""
    from ..methods import distributed as dd

    def track(iterable: Iterable, desc: str) -> Iterable:
        if dist.group is None:
            return _progress(iterable, desc, enabled, n_batches)
        return dd.GlobalProgress(n_samples, desc, enabled, dist.group).wrap(iterable)

    return track


def dawin_requested(methods) -> bool:
    return "dawin-cluster" in methods or "dawin-exact" in methods


def _shared_logits(args, methods, base, theta_zs, theta_ft, loader, device, tag: str, track, dist: _Dist):
    """Both models' logits over the set (this rank's shard), once: through DaWin's fit when DaWin runs (its
    mixture is fitted over all ranks), else directly."""
    desc = f"{tag} zero-shot + fine-tuned logits"
    if dawin_requested(methods):
        from ..methods.dawin import DaWin

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
        dawin.fit(track(loader, desc), group=dist.group if dist.group is not None else False)
        logits_zs, logits_ft = dawin.logits_
        return logits_zs, logits_ft, dawin.fit_labels_, dawin
    if any(m in methods for m in ("zeroshot", "finetuned", "ensemble")):
        from ..methods.blended import BlendedModels
        from ..methods.inference import collect_logits

        experts = BlendedModels(base, [theta_zs, theta_ft], n_models=2)
        experts.blend([[1.0, 0.0], [0.0, 1.0]])

        def collect():
            if len(loader) == 0:  # a rank with an empty shard
                return [torch.empty(0, 0), torch.empty(0, 0)], torch.empty(0, dtype=torch.long)
            return collect_logits(
                experts.models, track(loader, desc), names=["zero-shot model", "fine-tuned model"], device=device
            )

        (logits_zs, logits_ft), labels = dist.agree(collect, f"zero-shot/fine-tuned logits on {tag}")
        return logits_zs, logits_ft, labels, None
    return None, None, None, None


def _correct(scores: Tensor, labels: Tensor | None) -> tuple[int, int]:
    """(correct, total) of this rank's predictions; summed over ranks they give the exact accuracy."""
    if scores.shape[0] == 0:
        return 0, 0
    if labels is None or scores.shape[0] != labels.shape[0]:
        raise RuntimeError(f"{scores.shape[0]} predictions for {None if labels is None else labels.shape[0]} labels")
    return int((scores.argmax(dim=1).cpu() == labels.cpu()).sum()), int(labels.shape[0])


def _evaluate_set(
    args, methods, base: nn.Module, theta_zs, theta_ft, loader, device, set_name: str, track, seconds, dist: _Dist
) -> tuple[dict[str, float], list[int]]:
    """Accuracy of each method on one test set, and each rank's sample count. Both models' logits are computed
    once and shared. In a process group each rank scores its shard; (correct, total) counts are summed."""
    from ..methods import distributed as dd

    out: dict[str, float] = {}
    tag = f"[{set_name}]"

    def accuracy(scores: Tensor, labels: Tensor) -> float:
        if dist.group is None:
            return _accuracy(scores, labels)
        correct, total = dd.all_sum_int(_correct(scores, labels), dist.group)
        return correct / total

    def timed(method: str, fn: Callable[[], tuple[Tensor, Tensor]]) -> None:
        """``fn`` gives (scores, labels) of this rank's shard; the accuracy is over all ranks."""
        start = time.perf_counter()
        try:
            scores, labels = dist.agree(fn, f"{method} on {set_name}")
            out[method] = accuracy(scores, labels)
        except ValueError as e:
            raise MethodError(f"{method} on {set_name}: {e}") from e
        seconds[method] += time.perf_counter() - start

    n_local = len(loader.sampler) if loader.sampler is not None else len(loader.dataset)
    dawin = None
    start = time.perf_counter()
    try:
        logits_zs, logits_ft, labels, dawin = _shared_logits(
            args, methods, base, theta_zs, theta_ft, loader, device, tag, track, dist
        )
    except ValueError as e:
        stage = "DaWin fit" if dawin_requested(methods) else "zero-shot/fine-tuned logits"
        raise MethodError(f"{stage} on {set_name}: {e}") from e
    shared = time.perf_counter() - start
    rank_samples = [n_local] if dist.group is None else [int(n) for n in dd.all_gather_objects(n_local, dist.group)]
    for m in ("zeroshot", "finetuned"):
        if m in methods:
            seconds[m] += shared / 2
    if "zeroshot" in methods:
        out["zeroshot"] = accuracy(logits_zs, labels)
    if "finetuned" in methods:
        out["finetuned"] = accuracy(logits_ft, labels)
    if "ensemble" in methods:
        from ..methods.wise_ft import output_ensemble

        def ensemble():
            if logits_zs.shape[0] == 0:
                return logits_zs, labels
            return output_ensemble(logits_zs, logits_ft, weight=args.alpha), labels

        timed("ensemble", ensemble)
    if "wise-ft" in methods:

        def wise():
            from ..methods.wise_ft import wise_ft

            merged = copy.deepcopy(base)
            merged.load_state_dict(wise_ft(theta_zs, theta_ft, args.alpha))
            if n_local == 0:
                list(track(loader, f"{tag} WiSE-FT a={args.alpha}"))  # no batches; keeps the bar sequence aligned
                return torch.empty(0, 0), None
            return _run_batches(merged, loader, device, f"{tag} WiSE-FT a={args.alpha}", track)

        timed("wise-ft", wise)
    if dawin is not None:
        for m, mode in (("dawin-cluster", "cluster"), ("dawin-exact", "exact")):
            if m in methods:

                def dawin_scores(mode=mode):
                    scores = dawin.predict_dataset(
                        track(loader, f"{tag} DaWin {mode}"),
                        mode,
                        group=dist.group if dist.group is not None else False,
                    )
                    return scores, labels

                timed(m, dawin_scores)
    if "adawise" in methods:
        from ..methods.adawise import AdaWiSE

        def adawise():
            # Per rank: alpha is optimised per batch of the rank's shard; the warm start restarts at its first batch.
            ada = AdaWiSE(
                base, theta_zs, theta_ft, n_evals=args.adawise_evals, n_init=min(3, args.adawise_evals), seed=args.seed
            )
            if n_local == 0:
                list(track(loader, f"{tag} AdaWiSE"))
                return torch.empty(0, 0), None
            return _run_batches(ada.predict, loader, device, f"{tag} AdaWiSE", track)

        timed("adawise", adawise)
    return out, rank_samples


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
