"""Peak extra memory of one exact per-sample pass against one plain forward (open_clip ViT-B-32, batch 64, S=2).

Run: MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/exact_memory.py
With that threshold glibc serves large blocks by mmap and returns them on free, so the RSS high-water mark (reset
through /proc/self/clear_refs before each pass) follows the live allocations. Linux only.
"""

from __future__ import annotations

import gc

import open_clip
import torch

from dawin_ext import SampleWiseInterpolator


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_mib(fn) -> float:
    """RSS high-water mark during ``fn()`` minus the RSS before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    before = _status_mib("VmRSS:")
    out = fn()
    peak = _status_mib("VmHWM:")
    del out
    return peak - before


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    theta0 = {k: v.clone() for k, v in visual.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    theta1 = {
        k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if v.numel() > 1 else v.clone()
        for k, v in theta0.items()
    }
    sw = SampleWiseInterpolator(visual, [theta0, theta1])
    x = torch.randn(64, 3, 224, 224, generator=gen)
    lam = torch.rand(64, generator=gen)
    rows = torch.stack([1 - lam, lam], 1)
    with torch.inference_mode():
        visual(x)
        sw(x, rows)
        res: dict[str, list[float]] = {"plain forward": [], "exact pass": []}
        for _ in range(3):
            res["plain forward"].append(peak_extra_mib(lambda: visual(x)))
            res["exact pass"].append(peak_extra_mib(lambda: sw(x, rows)))
    for name, vals in res.items():
        print(f"{name}: peak extra {', '.join(f'{v:.0f}' for v in vals)} MiB")
    print(f"materialised per sample: {sw.last_materialized}")


if __name__ == "__main__":
    main()
