"""Peak extra memory of one exact per-sample pass against one plain forward (open_clip ViT-B-32, batch 64, S=2).

Run: MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/exact_memory.py
With that threshold glibc serves large blocks by mmap and returns them on free, so the RSS high-water mark (reset
through /proc/self/clear_refs before each pass) follows the live allocations. Linux only.
"""

from __future__ import annotations

import gc

import torch
from exact_vit_b32 import batch_and_rows, vit_b32_pair  # this folder: run as python benchmarks/exact_memory.py

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
    visual, theta0, theta1, gen = vit_b32_pair()
    sw = SampleWiseInterpolator(visual, [theta0, theta1])
    x, rows = batch_and_rows(gen)
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
