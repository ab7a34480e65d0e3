"""samplewise_conv on the convolution layers of timm convnext_atto and resnet18: every route against one plain conv.

Run: PYTHONPATH=. python -m pytest benchmarks/test_bench_samplewise_conv.py --benchmark-only -s -p no:cacheprovider
(test_model_with_samplewise_convs: each whole model with every Conv2d swapped for samplewise_conv, vs stock.)

The layer shapes are read off the models themselves (timm.create_model(name, pretrained=False), forward hooks on every
Conv2d, one 16x3x64x64 input). For each distinct shape: one plain ``F.conv2d`` with a single source's weight, and
:func:`samplewise_conv` with S = 2 sources along each route (``fold``, ``stacked``, ``linear`` where groups == 1,
``depthwise`` for 2-D depthwise layers) and
``auto``. Figures of one shape are interleaved round by round and the minimum is kept (the machine is shared).
The printed table gives each route's time over the plain conv; the summary line gives, per model, the sums over all
its conv layers (each shape times its count) of the auto route and of the best route per layer, over the plain sum,
and the plain model forward for scale (how much of it the convolutions are).

Environment: DAWIN_BENCH_ROUNDS (default 7); DAWIN_BENCH_THREADS (default: torch's); DAWIN_BENCH_CLOCK=cpu times
process CPU time instead of wall time (use it with DAWIN_BENCH_THREADS=1 on a busy machine: it leaves out the time
the process was descheduled).
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from dawin_ext.exact.conv import (
    MAX_PER_SAMPLE_WEIGHT_NUMEL,
    samplewise_conv,
    samplewise_conv_route,
    samplewise_conv_weights,
)

timm = pytest.importorskip("timm")

ROUNDS = int(os.environ.get("DAWIN_BENCH_ROUNDS", "7"))
_CLOCK = time.process_time if os.environ.get("DAWIN_BENCH_CLOCK") == "cpu" else time.perf_counter
BATCH, NUM_SOURCES = 16, 2
_CL = torch.channels_last
_ROUTE_COLUMNS = ("auto", "fold", "stacked", "linear", "depthwise")


def conv_layer_shapes(name: str) -> tuple[torch.nn.Module, list[tuple[dict, int]]]:
    """The model and its distinct Conv2d call shapes at batch 16 on 64x64 inputs, each with how often it occurs."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    calls: dict[tuple, int] = {}

    def hook(mod, inputs, output):
        key = (
            tuple(inputs[0].shape),
            tuple(mod.weight.shape),
            tuple(mod.stride),
            mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
            tuple(mod.dilation),
            mod.groups,
            mod.bias is not None,
            mod.padding_mode,
            # timm's ConvNeXt runs channels-last after its first LayerNorm2d; time each layer in the model's layout
            inputs[0].dim() == 4 and not inputs[0].is_contiguous() and inputs[0].is_contiguous(memory_format=_CL),
        )
        calls[key] = calls.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(torch.randn(BATCH, 3, 64, 64))
    for h in handles:
        h.remove()
    keys = ("x", "w", "stride", "padding", "dilation", "groups", "bias", "padding_mode", "channels_last")
    return model, [(dict(zip(keys, k, strict=True)), n) for k, n in calls.items()]


def _interleaved_min(fns: dict, rounds: int) -> dict[str, float]:
    for f in fns.values():
        f()
    times = {k: math.inf for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = _CLOCK()
            f()
            times[k] = min(times[k], _CLOCK() - t)
    return times


def _layer_inputs(shape: dict, gen: torch.Generator):
    x = torch.randn(shape["x"], generator=gen)
    if shape["channels_last"]:
        x = x.contiguous(memory_format=_CL)
    w = torch.randn(NUM_SOURCES, *shape["w"], generator=gen) / math.sqrt(math.prod(shape["w"][1:]))
    b = torch.randn(NUM_SOURCES, shape["w"][0], generator=gen) if shape["bias"] else None
    lam = torch.rand(shape["x"][0], generator=gen)
    c = torch.stack([1 - lam, lam], 1)
    return x, w, c, b


def _per_sample_reference(x, w, c, b, shape, samples: int) -> torch.Tensor:
    out = []
    for i in range(samples):
        wi = torch.einsum("s,s...->...", c[i].double(), w.double())
        bi = c[i].double() @ b.double() if b is not None else None
        out.append(
            F.conv2d(
                x[i : i + 1].double(), wi, bi, shape["stride"], shape["padding"], shape["dilation"], shape["groups"]
            )
        )
    return torch.cat(out)


@pytest.mark.parametrize("model_name", ["convnext_atto", "resnet18"])
def test_conv_layers(benchmark, model_name):
    threads = os.environ.get("DAWIN_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    model, shapes = conv_layer_shapes(model_name)
    gen = torch.Generator().manual_seed(0)
    totals = {"plain": 0.0, "auto": 0.0, "best": 0.0, "stacked": 0.0}
    rows = []
    layers = []
    with torch.inference_mode():
        x_model = torch.randn(BATCH, 3, 64, 64, generator=gen)
        t_model = _interleaved_min({"m": lambda: model(x_model)}, ROUNDS)["m"]
        for shape, count in shapes:
            x, w, c, b = _layer_inputs(shape, gen)
            geo = (shape["stride"], shape["padding"], shape["dilation"], shape["groups"], shape["padding_mode"])
            w0, b0 = w[0].clone(), (b[0].clone() if b is not None else None)
            fns = {"plain": lambda x=x, w0=w0, b0=b0, geo=geo: F.conv2d(x, w0, b0, *geo[:4])}
            # "fold" refuses weights over the per-sample copy budget; "linear" is for dense convolutions
            foldable = math.prod(shape["w"]) <= MAX_PER_SAMPLE_WEIGHT_NUMEL
            depthwise = shape["w"][1] == 1 and shape["w"][0] == shape["groups"]
            routes = ["auto", *(["fold"] if foldable else []), "stacked", *(["linear"] if shape["groups"] == 1 else [])]
            routes += ["depthwise"] if depthwise else []
            for r in routes:
                fns[r] = lambda r=r, x=x, w=w, c=c, b=b, geo=geo: samplewise_conv(x, w, c, b, *geo, route=r)
            t = _interleaved_min(fns, ROUNDS)
            # exactness on these inputs: auto against per-sample merging of the first samples
            err = (fns["auto"]()[:2].double() - _per_sample_reference(x, w, c, b, shape, 2)).abs().max().item()
            y0 = fns["plain"]()
            chosen = samplewise_conv_route(w.shape, math.prod(y0.shape[2:]), shape["groups"], x.dtype, x.device)
            best = min(t[r] for r in routes if r != "auto")
            for k in ("plain", "auto", "stacked"):
                totals[k] += t[k] * count
            totals["best"] += best * count
            rows.append(
                f"{str(shape['x']):18} {'NHWC' if shape['channels_last'] else 'NCHW'} {str(shape['w']):18} "
                f"s{shape['stride'][0]} g{shape['groups']:<4} x{count:<2} "
                f"plain {t['plain'] * 1e3:7.3f} ms | "
                + " ".join(f"{r} {t[r] / t['plain']:5.2f}x" if r in t else f"{r}     -" for r in _ROUTE_COLUMNS)
                + f" | auto={chosen} err {err:.1e}"
            )
            layers.append((x, w, c, b, geo, count))

        def all_layers_auto():
            for x, w, c, b, geo, count in layers:
                for _ in range(count):
                    samplewise_conv(x, w, c, b, *geo)

        benchmark.pedantic(all_layers_auto, rounds=max(1, ROUNDS // 2), iterations=1)

    info = {
        "model": model_name,
        "threads": torch.get_num_threads(),
        "clock": "cpu" if _CLOCK is time.process_time else "wall",
        "plain_model_forward_ms": t_model * 1e3,
        "plain_convs_ms": totals["plain"] * 1e3,
        "auto_over_plain": totals["auto"] / totals["plain"],
        "best_route_per_layer_over_plain": totals["best"] / totals["plain"],
        "all_stacked_over_plain": totals["stacked"] / totals["plain"],
        "extra_ms_auto": (totals["auto"] - totals["plain"]) * 1e3,
    }
    benchmark.extra_info.update(info)
    print(f"\n{model_name}: per layer, time over one plain F.conv2d with a single weight (S = {NUM_SOURCES})")
    print("\n".join(rows))
    print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))


class _SampleWiseConv2d(torch.nn.Module):
    """A Conv2d whose weights are S = 2 sources interpolated per sample through samplewise_conv (benchmark only)."""

    def __init__(self, conv: torch.nn.Conv2d, coefficients: dict, gen: torch.Generator) -> None:
        super().__init__()
        self.conv, self.coefficients = conv, coefficients
        w = conv.weight.detach()
        self.weights = samplewise_conv_weights([w, w + 0.01 * torch.randn(w.shape, generator=gen)])
        b = conv.bias
        self.biases = None if b is None else torch.stack([b.detach(), b.detach() + 0.01])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return samplewise_conv(
            x, self.weights, self.coefficients["c"], self.biases, c.stride, c.padding, c.dilation, c.groups,
            c.padding_mode,
        )  # fmt: skip


def _swap_convs(module: torch.nn.Module, coefficients: dict, gen: torch.Generator) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Conv2d):
            setattr(module, name, _SampleWiseConv2d(child, coefficients, gen))
        else:
            _swap_convs(child, coefficients, gen)


@pytest.mark.parametrize("model_name", ["convnext_atto", "resnet18"])
def test_model_with_samplewise_convs(benchmark, model_name):
    """The whole model with every Conv2d replaced by samplewise_conv (S = 2), everything else stock, against the
    stock forward: what the convolutions alone add to an exact forward pass (the engine adds per-sample norms etc.)."""
    import copy

    threads = os.environ.get("DAWIN_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    swapped = copy.deepcopy(model)
    lam = torch.rand(BATCH, generator=gen)
    coefficients = {"c": torch.stack([1 - lam, lam], 1)}
    _swap_convs(swapped, coefficients, gen)
    x = torch.randn(BATCH, 3, 64, 64, generator=gen)
    with torch.inference_mode():
        t = _interleaved_min({"plain": lambda: model(x), "samplewise_convs": lambda: swapped(x)}, ROUNDS)
        benchmark.pedantic(lambda: swapped(x), rounds=max(1, ROUNDS // 2), iterations=1)
    info = {
        "model": model_name,
        "threads": torch.get_num_threads(),
        "clock": "cpu" if _CLOCK is time.process_time else "wall",
        "plain_ms": t["plain"] * 1e3,
        "samplewise_convs_ms": t["samplewise_convs"] * 1e3,
        "ratio": t["samplewise_convs"] / t["plain"],
    }
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
