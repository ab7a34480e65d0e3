"""GPU throughput of the dawin_ext kernels as a fraction of a measured device-to-device copy.

Every figure is bytes that must move (each input read once, each output written once) over the
median time of CUDA-event-timed calls; the copy's bytes count the read and the write. Written for
benchmarks/gpu_check.sh; prints a markdown table and optionally writes JSON.

    python benchmarks/gpu_bandwidth.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

import dawin_ext
from dawin_ext.reference import entropy_reference

TARGET_FRACTION = 0.85


def time_cuda(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    x = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    t = time_cuda(lambda: y.copy_(x))
    return 2 * nbytes / t


def rows(copy_bw: float) -> list[dict]:
    out = []

    def add(kernel: str, size: str, nbytes: int, fn: Callable[[], object], ref: Callable[[], object] | None = None):
        t = time_cuda(fn)
        row = {"kernel": kernel, "size": size, "bytes": nbytes, "ms": t * 1e3, "GBps": nbytes / t / 1e9}
        row["fraction_of_copy"] = row["GBps"] * 1e9 / copy_bw
        if ref is not None:
            row["reference_ms"] = time_cuda(ref, iters=5) * 1e3
        out.append(row)

    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for b, c in ((16384, 1000), (65536, 1000), (262144, 1000), (8192, 32000), (1024, 100003)):
            x = (torch.randn(b, c, device="cuda", generator=gen) * 3).to(dtype)
            nbytes = x.numel() * x.element_size() + b * 4
            want = entropy_reference(x[:64].double(), 0.9)
            got = dawin_ext.softmax_entropy(x[:64], 0.9).double()
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            add(
                "softmax_entropy",
                f"{b}x{c} {name}",
                nbytes,
                lambda x=x: dawin_ext.softmax_entropy(x, 0.9),
                (lambda x=x: entropy_reference(x.float(), 0.9)) if b * c <= 65536 * 1000 else None,
            )
    logits = torch.randn(2, 65536, 1000, device="cuda", generator=gen)
    add(
        "entropy_coefficients",
        "M=2 65536x1000 fp32",
        logits.numel() * 4 + 2 * 65536 * 4,
        lambda logits=logits: dawin_ext.entropy_coefficients(logits, [0.9576, 0.9733]),
    )
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        stacked = torch.randn(64, 197, 2, 3072, device="cuda", generator=gen).to(dtype)
        w = torch.rand(64, 2, device="cuda", generator=gen)
        nbytes = stacked.numel() * stacked.element_size() * 3 // 2  # read S=2 planes, write 1
        add(
            "sample_combine",
            f"B=64 M=197 S=2 N=3072 {name}",
            nbytes,
            lambda s=stacked, w=w: dawin_ext.sample_combine(s, w),
        )
    if torch._C._dispatch_has_kernel_for_dispatch_key("dawin_ext::blend_", "CUDA"):
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            shapes = [(4096, 4096)] * 6 + [(3072,)] * 20 + [(768, 3072)] * 8
            srcs = [
                {f"p{i}": torch.randn(s, device="cuda", generator=gen).to(dtype) for i, s in enumerate(shapes)}
                for _ in range(2)
            ]
            outs = [{k: torch.empty_like(v) for k, v in srcs[0].items()} for _ in range(3)]
            coef = [[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]]
            numel = sum(v.numel() for v in srcs[0].values())
            nbytes = (2 + 3) * numel * srcs[0]["p0"].element_size()
            add(
                "blend out= K=3 S=2",
                f"{numel / 1e6:.0f}M params {name}",
                nbytes,
                lambda srcs=srcs, coef=coef, outs=outs: dawin_ext.blend(srcs, coef, out=outs),
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows and the device facts here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bandwidth.py: no CUDA device visible")
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    table = rows(copy_bw)
    facts = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dawin_ext": dawin_ext.build_info(),
        "copy_GBps": copy_bw / 1e9,
        "target_fraction": TARGET_FRACTION,
    }
    print(f"device {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"measured device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write, 1 GiB)")
    print()
    print("| kernel | size | ms | GB/s | fraction of copy | reference ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in table:
        ref = f"{r['reference_ms']:.3f}" if "reference_ms" in r else ""
        flag = "" if r["fraction_of_copy"] >= TARGET_FRACTION else " (below target)"
        print(
            f"| {r['kernel']} | {r['size']} | {r['ms']:.3f} | {r['GBps']:.0f} | {r['fraction_of_copy']:.2f}{flag} | {ref} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "rows": table}, f, indent=2)


if __name__ == "__main__":
    main()
