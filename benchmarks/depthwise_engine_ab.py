"""convnext_atto's exact pass with and without the "depthwise" convolution route, in one process.

Two interpolators of the same model and sources: one plans its depthwise layers with today's rule ("depthwise",
samplewise_depthwise_conv2d), the other with the rule before it (fold / stacked; made by emptying the route's dtype
list while that interpolator plans its layers, which it does once per layer and input shape). A plain forward and
the two exact passes are timed in turn for several rounds (medians), batch 16 at 64x64, S = 2, random init.

    python benchmarks/depthwise_engine_ab.py            # convnext_atto, 21 rounds, 2 threads
    python benchmarks/depthwise_engine_ab.py 31 1       # rounds, threads
"""

from __future__ import annotations

import statistics
import sys
import time

import timm
import torch

import dawin_ext.exact.conv as conv
from dawin_ext import SampleWiseInterpolator


def main(rounds: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() and v.numel() > 1 else v.clone()
        for k, v in sd.items()
    }
    x = torch.randn(16, 3, 64, 64)
    lam = torch.rand(16)
    rows = torch.stack([1 - lam, lam], 1)
    new, old = SampleWiseInterpolator(model, [sd, ft]), SampleWiseInterpolator(model, [sd, ft])
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
        times: dict[str, list[float]] = {k: [] for k in passes}
        for _ in range(rounds):
            for k, f in passes.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(", ".join(f"{k} {v:.1f} ms" for k, v in med.items()), end="; ")
    print(
        f"exact / plain: depthwise route {med['depthwise route'] / med['plain']:.2f}, before "
        f"{med['before'] / med['plain']:.2f}; depthwise route / before {med['depthwise route'] / med['before']:.2f}; "
        f"outputs differ by {diff:.2g}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 21, int(sys.argv[2]) if len(sys.argv) > 2 else 2)
