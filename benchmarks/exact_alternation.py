"""A timm model's exact pass (S=2) against a plain forward and against the same engine with one source, the three
timed in turn for several rounds in one process (medians). Batch 16 at 64x64, random init, wall time.

    python benchmarks/exact_alternation.py convnext_atto 15 2      # model, rounds, torch threads
"""

from __future__ import annotations

import statistics
import sys
import time

import timm
import torch

from dawin_ext import SampleWiseInterpolator


def main(name: str, rounds: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() and v.numel() > 1 else v.clone()
        for k, v in sd.items()
    }
    x = torch.randn(16, 3, 64, 64)
    lam = torch.rand(16)
    rows = torch.stack([1 - lam, lam], 1)
    two, one = SampleWiseInterpolator(model, [sd, ft]), SampleWiseInterpolator(model, [ft])
    passes = {"plain": lambda: model(x), "exact": lambda: two(x, rows), "one source": lambda: one(x, torch.ones(16, 1))}
    times = {k: [] for k in passes}
    with torch.inference_mode():
        for fn in passes.values():
            fn()
        for _ in range(rounds):
            for k, fn in passes.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(name, ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()), end="; ")
    print(f"exact / plain {med['exact'] / med['plain']:.2f}, one source / plain {med['one source'] / med['plain']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15, int(sys.argv[3]) if len(sys.argv) > 3 else 2)
