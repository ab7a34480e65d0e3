"""GPU throughput of the dawin_ext kernels as a fraction of a measured device-to-device copy.

Every figure is bytes that must move (each input read once, each output written once) over the median
time of one call. Two times per row, both by CUDA events on the current stream:
  op    the op alone, called through the dispatcher (torch.ops.dawin_ext.*) with its arguments prepared
        beforehand: the kernel(s) plus the op's own host work; GB/s and the fraction use this time;
  call  the whole public Python call (dawin_ext.*): argument checks, flattening, coefficient conversion.
Inputs smaller than a few L2 caches are rotated among copies so that repeated calls do not time the
cache. The copy's bytes count the read and the write. Written for benchmarks/gpu_check.sh; prints a
markdown table and optionally writes JSON.

    python benchmarks/gpu_bandwidth.py --json out.json
    python benchmarks/gpu_bandwidth.py --rehearse     # tiny sizes on the CPU: checks the script, not the GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

import dawin_ext
from dawin_ext.ops.wrappers import _as_coefficient_matrix
from dawin_ext.testing.reference_ops import entropy_reference

TARGET_FRACTION = 0.85
ROTATE_BYTES = 512 << 20  # several times the H200's 60 MB L2
ops = torch.ops.dawin_ext


class Timer:
    """Median seconds of fn(i) over calls i = 0, 1, ...: CUDA events on CUDA, perf_counter on the CPU."""

    def __init__(self, device: str, iters: int, warmup: int) -> None:
        self.device, self.iters, self.warmup = device, iters, warmup

    def __call__(self, fn: Callable[[int], object], iters: int | None = None) -> float:
        iters = iters or self.iters
        for i in range(self.warmup):
            fn(i)
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
        times = []
        for i in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(i)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def copies(make: Callable[[], object], nbytes: int, limit: int = 8) -> list:
    """Enough independent inputs that cycling through them exceeds ROTATE_BYTES (at most `limit`)."""
    n = max(1, min(limit, -(-ROTATE_BYTES // max(nbytes, 1))))
    return [make() for _ in range(n)]


def copy_bandwidth(timer: Timer, device: str, nbytes: int) -> float:
    x = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    return 2 * nbytes / timer(lambda i: y.copy_(x))


def rows(timer: Timer, device: str, copy_bw: float, small: bool) -> list[dict]:
    out = []

    def add(kernel, size, nbytes, op: Callable[[int], object], call: Callable[[int], object], ref=None):
        t_op = timer(op)
        t_call = timer(call)
        row = {
            "kernel": kernel,
            "size": size,
            "bytes": nbytes,
            "op_ms": t_op * 1e3,
            "call_ms": t_call * 1e3,
            "GBps": nbytes / t_op / 1e9,
        }
        row["fraction_of_copy"] = row["GBps"] * 1e9 / copy_bw
        if ref is not None:
            row["reference_ms"] = timer(ref, iters=5) * 1e3
        out.append(row)

    gen = torch.Generator(device=device).manual_seed(0)
    sizes = (
        ((64, 1000), (8, 5000))
        if small
        else ((16384, 1000), (65536, 1000), (262144, 1000), (8192, 32000), (1024, 100003))
    )
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for b, c in sizes:
            nbytes = b * c * dtype.itemsize + b * 4
            xs = copies(
                lambda b=b, c=c, dtype=dtype: (torch.randn(b, c, device=device, generator=gen) * 3).to(dtype), nbytes
            )
            want = entropy_reference(xs[0][:64].double(), 0.9)
            torch.testing.assert_close(ops.softmax_entropy(xs[0][:64], 0.9).double(), want, atol=1e-4, rtol=1e-4)
            add(
                "softmax_entropy",
                f"{b}x{c} {name}",
                nbytes,
                lambda i, xs=xs: ops.softmax_entropy(xs[i % len(xs)], 0.9),
                lambda i, xs=xs: dawin_ext.softmax_entropy(xs[i % len(xs)], 0.9),
                (lambda i, xs=xs: entropy_reference(xs[i % len(xs)].float(), 0.9)) if b * c <= 65536 * 1000 else None,
            )
    b, c = (64, 1000) if small else (65536, 1000)
    nbytes = 2 * b * c * 4 + 2 * b * 4 * 2
    logits = copies(lambda: torch.randn(2, b, c, device=device, generator=gen), nbytes)
    temps = [0.9576, 0.9733]
    add(
        "entropy_coefficients",
        f"M=2 {b}x{c} fp32",
        nbytes,
        lambda i: ops.entropy_coefficients(logits[i % len(logits)], temps, False),
        lambda i: dawin_ext.entropy_coefficients(logits[i % len(logits)], temps),
    )
    B, M, N = (4, 17, 64) if small else (64, 197, 3072)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        nbytes = 3 * B * M * N * dtype.itemsize  # read S=2 planes, write 1
        stacked = copies(lambda dtype=dtype: torch.randn(B, M, 2, N, device=device, generator=gen).to(dtype), nbytes)
        w = torch.rand(B, 2, device=device, generator=gen)
        add(
            "sample_combine",
            f"B={B} M={M} S=2 N={N} {name}",
            nbytes,
            lambda i, s=stacked, w=w: ops.sample_combine(s[i % len(s)], w),
            lambda i, s=stacked, w=w: dawin_ext.sample_combine(s[i % len(s)], w),
        )
    if torch._C._dispatch_has_kernel_for_dispatch_key("dawin_ext::blend_", "CUDA" if device == "cuda" else "CPU"):
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            shapes = [(64, 64)] * 2 + [(30,)] * 3 if small else [(4096, 4096)] * 6 + [(3072,)] * 20 + [(768, 3072)] * 8
            srcs = [
                {f"p{i}": torch.randn(s, device=device, generator=gen).to(dtype) for i, s in enumerate(shapes)}
                for _ in range(2)
            ]
            outs = [{k: torch.empty_like(v) for k, v in srcs[0].items()} for _ in range(3)]
            coef = [[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]]
            keys = list(srcs[0])
            flat_src = [sd[k] for sd in srcs for k in keys]
            flat_out = [o[k] for o in outs for k in keys]
            coef_t = _as_coefficient_matrix(coef, 2)
            numel = sum(v.numel() for v in srcs[0].values())
            nbytes = (2 + 3) * numel * dtype.itemsize
            add(
                "blend out= K=3 S=2",
                f"{numel / 1e6:.2f}M params {name}",
                nbytes,
                lambda i, fs=flat_src, c=coef_t, fo=flat_out: ops.blend_(fs, c, fo),
                lambda i, srcs=srcs, coef=coef, outs=outs: dawin_ext.blend(srcs, coef, out=outs),
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows and the device facts here")
    parser.add_argument("--rehearse", action="store_true", help="tiny sizes on the CPU, to check the script itself")
    args = parser.parse_args()
    if args.rehearse:
        device, timer, copy_bytes = "cpu", Timer("cpu", iters=3, warmup=1), 8 << 20
        props_name, sm_count = "CPU (rehearsal: not a measurement)", None
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_bandwidth.py: no CUDA device visible (use --rehearse to check the script on a CPU)")
        device, timer, copy_bytes = "cuda", Timer("cuda", iters=20, warmup=3), 1 << 30
        props = torch.cuda.get_device_properties(0)
        props_name, sm_count = props.name, props.multi_processor_count
    copy_bw = copy_bandwidth(timer, device, copy_bytes)
    table = rows(timer, device, copy_bw, small=args.rehearse)
    facts = {
        "device": props_name,
        "sm_count": sm_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dawin_ext": dawin_ext.build_info(),
        "copy_GBps": copy_bw / 1e9,
        "target_fraction": TARGET_FRACTION,
        "timing": "median of 20 (CUDA events): op = torch.ops.dawin_ext.* alone; call = the public Python call",
    }
    print(f"device {props_name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"measured copy: {copy_bw / 1e9:.0f} GB/s (read + write, {copy_bytes >> 20} MiB)")
    print()
    print("| kernel | size | op ms | call ms | GB/s (op) | fraction of copy | reference ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in table:
        ref = f"{r['reference_ms']:.3f}" if "reference_ms" in r else ""
        flag = "" if r["fraction_of_copy"] >= TARGET_FRACTION else " (below target)"
        print(
            f"| {r['kernel']} | {r['size']} | {r['op_ms']:.3f} | {r['call_ms']:.3f} | {r['GBps']:.0f} "
            f"| {r['fraction_of_copy']:.2f}{flag} | {ref} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "rows": table}, f, indent=2)


if __name__ == "__main__":
    main()
