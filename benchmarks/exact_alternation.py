"""A timm model's exact pass (S=2) against a plain forward and against the same engine with one source, the three
timed in turn for several rounds in one process (medians). Batch 16 (or the fourth argument) at 64x64, random init,
wall time.

    python benchmarks/exact_alternation.py convnext_atto 15 2      # model, rounds, torch threads
    python benchmarks/exact_alternation.py convnext_atto 21 2 1    # batch 1: the per-call costs alone
"""

from __future__ import annotations

import sys

import torch
from _timing import interleaved_medians_ms, timm_model_with_sources

from dawin_ext import SampleWiseInterpolator


def main(name: str, rounds: int = 15, threads: int = 2, batch: int = 16) -> None:
    torch.set_num_threads(threads)
    model, (sd, ft), x, rows = timm_model_with_sources(name, batch)
    two, one = SampleWiseInterpolator(model, [sd, ft]), SampleWiseInterpolator(model, [ft])
    passes = {
        "plain": lambda: model(x),
        "exact": lambda: two(x, rows),
        "one source": lambda: one(x, torch.ones(batch, 1)),
    }
    with torch.inference_mode():
        med = interleaved_medians_ms(passes, rounds)
    print(f"{name} batch {batch}:", ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()), end="; ")
    print(f"exact / plain {med['exact'] / med['plain']:.2f}, one source / plain {med['one source'] / med['plain']:.2f}")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[2:]]
    main(sys.argv[1], *args)
