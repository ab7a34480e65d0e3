"""``dawin-ext demo``: the embedded robust-adaptation benchmark on scikit-learn's digits (offline, CPU).

A small CNN is "pretrained" as a generalist on a broad, heavily augmented distribution of the digits and
fine-tuned into a specialist on the clean digits; every method then runs on an ID test set and on seven
shifted copies of it. The run prints a table and writes ``report.md``, ``results.json`` and three plots.
Trained checkpoints are cached (``--cache-dir``), so a second run skips training.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``demo`` subcommand's options."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, augmentations and training")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="checkpoint cache (default: $DAWIN_EXT_CACHE/demo or ~/.cache/dawin_ext/demo)",
    )
    parser.add_argument("--retrain", action="store_true", help="train again even if the cache holds the checkpoints")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the 16x16 CNN's ops are too small to gain from more, and on a "
        "busy machine extra threads slow training down many times over)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per method and set (median)")
    parser.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="also rewrite the 'Embedded benchmark' section of this markdown file (e.g. benchmarks/RESULTS.md)",
    )
    parser.add_argument("--no-bench", action="store_true", help="skip the kernel and pipeline speed table at the end")


def _bench_table(threads: int) -> str:
    """The ``dawin-ext bench --quick --pipeline`` table (CPU), run with ``threads`` torch threads."""
    import torch

    from dawin_ext.cli import bench

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        env = bench.environment("cpu")
        rows = bench.kernel_rows("cpu", quick=True)
        rows += bench.pipeline_rows(torch.device("cpu"), quick=True, repeats=3)
    finally:
        torch.set_num_threads(previous)
    head = (
        f"CPU, torch {env['torch']}, {env['threads']} threads, CPU capability {env['cpu_capability']}; "
        "ratio = reference median / ours median, both measured alternately in this run"
    )
    return head + "\n" + bench.format_table(rows)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints the table and writes the report; returns the exit status."""
    import torch

    from .report import results_table, update_results_section, write_report
    from .runner import DemoConfig, run_benchmark
    from .train import TrainConfig

    # The kernel table runs with torch's default thread count (the kernels are parallel); the demo itself with --threads.
    default_threads = torch.get_num_threads()

    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    cfg = DemoConfig(
        train=TrainConfig(seed=args.seed),
        repeats=args.repeats,
        cache_dir=args.cache_dir,
        retrain=args.retrain,
    )
    result = run_benchmark(cfg)
    print()
    print(results_table(result))
    bench = None if args.no_bench else _bench_table(default_threads)
    if bench:
        print("\nKernel and pipeline speed (dawin-ext bench --quick --pipeline):")
        print(bench)
    report = write_report(result, args.out, bench_table=bench)
    wall = time.perf_counter() - t0
    if args.results_md is not None:
        # The options exactly as given, so that the documented command reproduces this section.
        opts = " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["demo"] else ""
        command = f"dawin-ext demo {opts}".strip()
        update_results_section(result, args.results_md, args.out, command, wall)
        print(f"updated the embedded-benchmark section of {args.results_md}")
    print(f"\nreport: {report}  (plots and results.json next to it); total {wall:.1f} s")
    return 0
