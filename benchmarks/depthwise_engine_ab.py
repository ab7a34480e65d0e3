"""convnext_atto's exact pass with and without the "depthwise" convolution route, in one process.

Two interpolators of the same model and sources: one plans its depthwise layers with today's rule ("depthwise",
samplewise_depthwise_conv2d), the other with the rule before it (fold / stacked; made by emptying the route's dtype
list while that interpolator plans its layers, which it does once per layer and input shape). A plain forward and
the two exact passes are timed in turn for several rounds (medians), batch 16 at 64x64, S = 2, random init.

    python benchmarks/depthwise_engine_ab.py            # convnext_atto, 21 rounds, 2 threads
    python benchmarks/depthwise_engine_ab.py 31 1       # rounds, threads
"""

from __future__ import annotations

import sys

import torch
from _timing import interleaved_medians_ms, timm_model_with_sources

import dawin_ext.exact.conv as conv
from dawin_ext import SampleWiseInterpolator


def main(rounds: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model, sources, x, rows = timm_model_with_sources("convnext_atto")
    new, old = SampleWiseInterpolator(model, sources), SampleWiseInterpolator(model, sources)
    with torch.inference_mode():
        kept = conv._DEPTHWISE_DTYPES
        conv._DEPTHWISE_DTYPES = ()
        try:
            y_old = old(x, rows)  # plans every layer now, without the depthwise route
        finally:
            conv._DEPTHWISE_DTYPES = kept
        y_new = new(x, rows)
        diff = (y_old - y_new).abs().max().item()
        passes = {"plain": lambda: model(x), "depthwise route": lambda: new(x, rows), "before": lambda: old(x, rows)}
        med = interleaved_medians_ms(passes, rounds)
    print(", ".join(f"{k} {v:.1f} ms" for k, v in med.items()), end="; ")
    print(
        f"exact / plain: depthwise route {med['depthwise route'] / med['plain']:.2f}, before "
        f"{med['before'] / med['plain']:.2f}; depthwise route / before {med['depthwise route'] / med['before']:.2f}; "
        f"outputs differ by {diff:.2g}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 21, int(sys.argv[2]) if len(sys.argv) > 2 else 2)
