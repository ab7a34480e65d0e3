"""The ``dawin-ext`` command line: ``eval``, ``bench`` and ``demo``.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``dawin-ext --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "eval": (
        "dawin_ext.cli.eval",
        "evaluate zero-shot/fine-tuned open_clip or Hugging Face CLIP checkpoints with every method",
    ),
    "bench": ("dawin_ext.cli.bench", "kernel and pipeline benchmarks against the plain-PyTorch reference"),
    "demo": ("dawin_ext.cli.demo", "the embedded digits robust-adaptation benchmark (offline, ~2 minutes)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dawin-ext", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are added lazily only for the chosen subcommand (see main).
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # First pass finds the subcommand; second pass parses its own arguments.
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"dawin-ext {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        return int(module.run(args) or 0)
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
