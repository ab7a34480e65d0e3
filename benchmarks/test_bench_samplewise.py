"""Exact per-sample interpolation (SampleWiseInterpolator) against one plain forward and the per-sample loop.

Run: python -m pytest benchmarks/test_bench_samplewise.py --benchmark-only -s
ViT-B-32 visual tower at random init (no download), batch 64, two sources, fp32, under torch.inference_mode.
Every figure of a test is measured in the same run and interleaved round by round, so machine load hits all
of them alike. The printed line and ``extra_info`` hold the ratios; with ``DAWIN_BENCH_ASSERT=1`` the
issue-4 targets are asserted: at most 2.5x one plain forward pass and at least 3.5x faster than the reference
per-sample merge-and-forward loop. A second, faster loop (dawin_ext.blend into the live state dict, no fresh allocation) is reported too.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch

import dawin_ext
from dawin_ext import SampleWiseInterpolator
from dawin_ext.testing.reference_ops import interpolation_reference

open_clip = pytest.importorskip("open_clip")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROUNDS = int(os.environ.get("DAWIN_BENCH_ROUNDS", "3"))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _vit_b32_sources(device: str):
    from exact_vit_b32 import vit_b32_pair  # this folder (pytest puts it on sys.path)

    visual, theta0, theta1, _ = vit_b32_pair()
    visual = visual.to(device)
    return visual, [{k: v.to(device) for k, v in sd.items()} for sd in (theta0, theta1)]


@pytest.mark.parametrize("device", DEVICES)
def test_samplewise_vit_b32(benchmark, device):
    batch = 64 if device == "cpu" else 256
    visual, sources = _vit_b32_sources(device)
    sw = {"engine": SampleWiseInterpolator(visual, sources), "one_source": SampleWiseInterpolator(visual, sources[1:])}
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, 224, 224, generator=gen).to(device)
    lam = torch.rand(batch, generator=gen).to(device)
    rows = torch.stack([1 - lam, lam], 1)

    ref_model = copy.deepcopy(visual)
    live = ref_model.state_dict()

    def reference_loop():  # the public DaWin sample-wise mode: merge the state dict, load it, run one sample
        for b in range(batch):
            ref_model.load_state_dict(interpolation_reference(float(lam[b]), sources[0], sources[1]))
            ref_model(x[b : b + 1])

    def blend_loop():  # a stronger loop: blend in place into the live parameters, no allocation, no load
        for b in range(batch):
            dawin_ext.blend(sources, [[1 - float(lam[b]), float(lam[b])]], out=[live])
            ref_model(x[b : b + 1])

    ones = torch.ones(batch, 1, device=x.device)
    times: dict[str, list[float]] = {"plain": [], "sw_engine": [], "sw_one_source": []}
    with torch.inference_mode():
        visual(x)
        sw["engine"](x, rows)
        sw["one_source"](x, ones)
        for _ in range(ROUNDS):
            times["plain"].append(_timed(lambda: visual(x), device))
            times["sw_engine"].append(_timed(lambda: sw["engine"](x, rows), device))
            times["sw_one_source"].append(_timed(lambda: sw["one_source"](x, ones), device))
        t_ref_loop = _timed(reference_loop, device)
        t_blend_loop = _timed(blend_loop, device)
        # exactness on the benchmark inputs: the last merged model is sample batch-1's
        torch.testing.assert_close(sw["engine"](x[-1:], rows[-1:]), ref_model(x[-1:]), atol=1e-4, rtol=0)

        best_name = "sw_engine"
        best = sw["engine"]
        result = benchmark.pedantic(lambda: (best(x, rows), _sync(device)), rounds=ROUNDS, iterations=1)
    del result

    med = {k: statistics.median(v) for k, v in times.items()}
    t_sw = med[best_name]
    info = {
        "device": device,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "plain_s": med["plain"],
        "samplewise_s": med["sw_engine"],
        "samplewise_one_source_s": med["sw_one_source"],
        "samplewise_over_one_source": med["sw_engine"] / med["sw_one_source"],
        "reference_loop_s": t_ref_loop,
        "blend_loop_s": t_blend_loop,
        "samplewise_over_plain": t_sw / med["plain"],
        "reference_loop_over_samplewise": t_ref_loop / t_sw,
        "blend_loop_over_samplewise": t_blend_loop / t_sw,
    }
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    # The issue-4 targets depend on the machine (the reference loop's cost is mostly fresh-memory page
    # faults, which vary several-fold on this VM), so they are asserted only on request.
    if os.environ.get("DAWIN_BENCH_ASSERT") == "1":
        assert info["samplewise_over_plain"] <= 2.5, info
        if device == "cpu":
            assert info["reference_loop_over_samplewise"] >= 3.5, info
        else:
            assert info["reference_loop_over_samplewise"] >= 200, info


def _combine(partials: torch.Tensor, weights: torch.Tensor, strategy: str) -> torch.Tensor:
    """``[B, M, G, N]`` x ``[B, G]`` -> ``[B, M, N]``: the kernel or an addcmul chain (samplewise_conv's combine)."""
    if strategy == "kernel":
        return dawin_ext.sample_combine(partials, weights)
    out = torch.addcmul(partials[:, :, 0], partials[:, :, 1], weights[:, 1, None, None])
    for g in range(2, partials.shape[2]):
        out.addcmul_(partials[:, :, g], weights[:, g, None, None])
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["kernel", "torch"])
@pytest.mark.parametrize(
    "shape",
    [(64, 50, 2, 768), (64, 50, 2, 2304), (64, 50, 3, 768), (64, 1, 2, 768 * 49)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_combine_strategies(benchmark, device, strategy, shape):
    """The per-sample blend of partial outputs on ViT-B-32 shapes: dawin_ext.sample_combine vs an addcmul chain."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(shape, generator=gen).to(device)
    w = torch.rand(shape[0], shape[2], generator=gen).to(device)
    w[:, 0] = 1
    benchmark.group = f"combine {device} {'x'.join(map(str, shape))}"
    out = benchmark(lambda: (_combine(y, w, strategy), _sync(device))[0])
    ref = torch.einsum("bmgn,bg->bmn", y.double(), w.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["samplewise_linear", "stacked_gemm", "plain_linear"])
@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (768, 2304)], ids=lambda s: f"{s[0]}to{s[1]}")
def test_samplewise_linear_op(benchmark, device, impl, shape):
    """One ViT-B-32 linear layer at batch 64 x 50 tokens, two sources: dawin_ext.samplewise_linear (per-sample
    weights merged in cache) vs the stacked GEMM on [W0; W1 - W0] plus a per-sample blend, and one plain
    F.linear of a single source for scale."""
    k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 50, k, generator=gen).to(device)
    w0, w1 = (torch.randn(n, k, generator=gen).div(k**0.5).to(device) for _ in range(2))
    lam = torch.rand(64, generator=gen).to(device)
    coef = torch.stack([torch.ones_like(lam), lam], 1)
    fast = dawin_ext.samplewise_linear_weights([w0, w1 - w0])
    stacked_w = torch.cat([w0, w1 - w0])
    fns = {
        "samplewise_linear": lambda: dawin_ext.samplewise_linear(x, fast, coef),
        "stacked_gemm": lambda: _combine(torch.nn.functional.linear(x, stacked_w).view(64, 50, 2, n), coef, "torch"),
        "plain_linear": lambda: torch.nn.functional.linear(x, w0),
    }
    benchmark.group = f"samplewise_linear {device} {k}->{n}"
    benchmark.extra_info.update(cpu_path=dawin_ext.ops.samplewise_linear_cpu_path())
    with torch.inference_mode():
        out = benchmark(lambda: (fns[impl](), _sync(device))[0])
        if impl != "plain_linear":
            want = torch.einsum("bmk,nk->bmn", x.double(), w0.double()) + lam.double().view(-1, 1, 1) * torch.einsum(
                "bmk,nk->bmn", x.double(), (w1 - w0).double()
            )
            torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["vit_small", "hf_clip_vision", "convnext_atto", "resnet18"])
def test_exact_engine_models(benchmark, model):
    """The exact engine's speed points: the engine (S=2) against a plain forward and against one source."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from dawin_ext.cli.bench import exact_engine_rows

    names = {
        "vit_small": "timm vit_small",
        "hf_clip_vision": "transformers CLIPVisionModel",
        "convnext_atto": "timm convnext_atto",
        "resnet18": "timm resnet18",
    }
    import dawin_ext.cli.bench as bench

    models = bench._exact_models(quick=False)
    picked = [m for m in models if m[0].startswith(names[model])]
    original = bench._exact_models
    bench._exact_models = lambda quick: picked
    try:
        rows = benchmark.pedantic(lambda: exact_engine_rows(torch.device("cpu"), False, ROUNDS), rounds=1, iterations=1)
    finally:
        bench._exact_models = original
    info = {"over_plain": rows[0]["over_plain"], "over_one_source": rows[1]["over_one_source"]}
    benchmark.extra_info.update(info)
    print(f"\n{rows[0]['case']}: {info}")
    if os.environ.get("DAWIN_BENCH_ASSERT") == "1":
        limit = 2.0 if model in ("convnext_atto", "resnet18") else 1.5
        assert info["over_plain"] <= limit, info
