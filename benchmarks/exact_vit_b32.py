"""One exact per-sample pass of open_clip ViT-B-32 at batch 64 (S=2) against a plain forward, in this process.

Comparing two versions of the engine: build each in its own checkout and alternate processes, e.g.
    for i in 1 2; do PYTHONPATH=OLD python benchmarks/exact_vit_b32.py old; PYTHONPATH=NEW python benchmarks/exact_vit_b32.py new; done
(the script only uses ``dawin_ext.SampleWiseInterpolator``, which both versions have).
"""

from __future__ import annotations

import statistics
import sys
import time

import open_clip
import torch

import dawin_ext


def vit_b32_pair() -> tuple[torch.nn.Module, dict, dict, torch.Generator]:
    """open_clip ViT-B-32's image tower at random init, its state dict and a perturbed copy (the benchmarks' two
    sources), and the generator to draw inputs from next."""
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    theta0 = {k: v.clone() for k, v in visual.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    theta1 = {
        k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if v.numel() > 1 else v.clone()
        for k, v in theta0.items()
    }
    return visual, theta0, theta1, gen


def batch_and_rows(gen: torch.Generator, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image batch and its coefficient rows ``[1 - lam, lam]``."""
    x = torch.randn(batch, 3, 224, 224, generator=gen)
    lam = torch.rand(batch, generator=gen)
    return x, torch.stack([1 - lam, lam], 1)


def main(label: str) -> None:
    torch.set_num_threads(2)
    visual, theta0, theta1, gen = vit_b32_pair()
    sw = dawin_ext.SampleWiseInterpolator(visual, [theta0, theta1])
    x, rows = batch_and_rows(gen)
    exact, plain = [], []
    with torch.inference_mode():
        sw(x, rows)
        visual(x)
        for _ in range(3):
            t0 = time.perf_counter()
            sw(x, rows)
            exact.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            visual(x)
            plain.append(time.perf_counter() - t0)
    e, p = statistics.median(exact), statistics.median(plain)
    print(f"{label}: exact {e * 1e3:.0f} ms, plain {p * 1e3:.0f} ms, exact/plain {e / p:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this")
