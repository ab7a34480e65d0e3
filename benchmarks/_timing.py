"""Shared by the exact-engine benchmark scripts: the timm model with two sources they time, and the interleaved
timing loop (every call timed in turn, round after round, so that a drifting machine slows all of them alike)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import timm
import torch


def timm_model_with_sources(name: str, batch: int = 16, size: int = 64):
    """``(model, [sd, ft], x, rows)``: timm ``name`` at random init (seed 0) in eval mode, its state dict and a copy
    with every float tensor of more than one entry perturbed by 0.01 N(0, 1), an input ``[batch, 3, size, size]``
    and coefficient rows ``[1 - lam, lam]``."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() and v.numel() > 1 else v.clone()
        for k, v in sd.items()
    }
    x = torch.randn(batch, 3, size, size)
    lam = torch.rand(batch)
    return model, [sd, ft], x, torch.stack([1 - lam, lam], 1)


def interleaved_medians_ms(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each call once untimed, then ``rounds`` rounds timing every call in turn: the median of each, in ms."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
