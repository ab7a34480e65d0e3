"""samplewise_conv's routes for convnext_atto's 7x7 depthwise layers (batch 16 on 64x64 inputs, S = 2), against one
stock depthwise convolution on the same input (channels-last, as the exact engine passes it, and NCHW, as a plain
timm forward has it). Medians over interleaved rounds in one process, wall time, milliseconds.

    python benchmarks/depthwise_routes.py            # 2 threads, 30 rounds
    python benchmarks/depthwise_routes.py 1 50       # threads, rounds
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from _timing import interleaved_medians_ms

from dawin_ext.exact.conv import samplewise_conv_plan

LAYERS = [(40, 16), (80, 8), (160, 4), (320, 2)]  # (channels, map size) of the four stages
BATCH, SOURCES, KERNEL = 16, 2, 7


def main(threads: int, rounds: int) -> None:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {threads}, rounds {rounds}, batch {BATCH}, S = {SOURCES}, {KERNEL}x{KERNEL} depthwise, padding 3")
    print("| C | map | plain NCHW | plain channels-last | depthwise | fold | stacked | depthwise / plain c-l |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, size in LAYERS:
        x = torch.randn(BATCH, c, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
        xn = x.contiguous()
        w = torch.randn(SOURCES, c, 1, KERNEL, KERNEL, generator=gen) / KERNEL
        b = torch.randn(SOURCES, c, generator=gen)
        coef = torch.rand(BATCH, SOURCES, generator=gen)
        plans = {r: samplewise_conv_plan(x, w, b, 1, 3, 1, c, route=r) for r in ("depthwise", "fold", "stacked")}
        passes = {
            "plain NCHW": lambda xn=xn, w=w, b=b, c=c: F.conv2d(xn, w[0], b[0], 1, 3, 1, c),
            "plain channels-last": lambda x=x, w=w, b=b, c=c: F.conv2d(x, w[0], b[0], 1, 3, 1, c),
            **{r: (lambda p=p, x=x, coef=coef: p(x, coef)) for r, p in plans.items()},
        }
        with torch.inference_mode():
            ref = plans["fold"](x, coef)
            err = (plans["depthwise"](x, coef) - ref).abs().max().item()
            assert err <= 1e-4 * ref.abs().max().item(), f"routes disagree: {err}"
            med = interleaved_medians_ms(passes, rounds)
        cells = " | ".join(f"{v:.3f}" for v in med.values())
        print(f"| {c} | {size}x{size} | {cells} | {med['depthwise'] / med['plain channels-last']:.2f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2, int(sys.argv[2]) if len(sys.argv) > 2 else 30)
