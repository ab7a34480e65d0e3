"""ViT-B-32's patch embedding (768 x 3 x 32 x 32, stride 32) through samplewise_conv's "stacked" and "linear" routes
against one plain convolution: batch 64 at 224 px, S=2, minimum of 5 timed calls each.

    python benchmarks/patch_embed_routes.py 2      # torch threads
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from dawin_ext.exact.conv import samplewise_conv


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 224, 224, generator=g)
    w = torch.randn(2, 768, 3, 32, 32, generator=g) * 0.02
    c = torch.rand(64, 2, generator=g)
    calls = {
        "stacked": lambda: samplewise_conv(x, w, c, stride=32, route="stacked"),
        "linear": lambda: samplewise_conv(x, w, c, stride=32, route="linear"),
        "plain conv": lambda: F.conv2d(x, w[0], stride=32),
    }
    with torch.inference_mode():
        for name, fn in calls.items():
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            print(f"{name}: {min(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
