"""One small run that reaches every CUDA kernel path of dawin_ext, for compute-sanitizer (gpu_check.sh).

Each case calls the op directly (torch.ops.dawin_ext.*) on small inputs shaped to take one kernel path and
checks the result against a float64 reference, so that a run under memcheck / racecheck / synccheck is
also a correctness check. The paths:

- softmax_entropy, warp-per-row kernel (C <= 4096) and block-per-row kernel (C > 4096), each on aligned
  rows, rows that start off a 16-byte boundary (head + vector + tail), and a non-unit class stride;
  fp32, fp16, bf16;
- entropy_coefficients (M = 2, with and without the offset adjustment; it launches the entropy kernels
  on row ranges of one tensor);
- blend: the S = 2, K = 1..4 register specialisations, the generic re-read path (S = 3, outputs apart
  from the sources), the generic in-register path (an output aliasing a source), misaligned views (the
  element-by-element path), several chunks per tensor, fp32 / fp64 / fp16 / bf16;
- sample_combine: the 16-byte vector path and the scalar path (N not a multiple of the vector width);
- samplewise_linear: with and without biases, fp32 and bf16 (cuBLAS GEMMs + the blend_partials kernel).
- samplewise_lora: with and without a base weight, fp32 and bf16 (cuBLAS GEMMs + the per-sample scaling kernel).
- samplewise_depthwise_conv2d: with and without biases, fp32 and fp16, a 7x7 kernel larger than the map and a
  strided, dilated one (the mix kernel + the per-output kernel).

    python benchmarks/gpu_sanitize_cases.py --device cuda             # what the sanitizer runs
    python benchmarks/gpu_sanitize_cases.py --device cuda --coverage  # + which kernels ran (torch.profiler)
    python benchmarks/gpu_sanitize_cases.py --device cpu              # rehearsal of the script itself

--coverage lists the kernels that ran and fails when one of KERNEL_PATHS did not (it uses CUPTI, so it is
run separately, not under the sanitizer).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

import dawin_ext  # noqa: F401  (registers torch.ops.dawin_ext)
from dawin_ext.testing.reference_ops import entropy_reference

ops = torch.ops.dawin_ext

# Every kernel instance the cases must launch on CUDA: (label, regex on the demangled kernel name).
KERNEL_PATHS = [
    ("softmax_entropy warp-per-row", r"entropy_warp_rows_kernel"),
    ("softmax_entropy block-per-row", r"entropy_block_rows_kernel"),
    ("blend S=2 K=1", r"blend_kernel<false, 2, 1>"),
    ("blend S=2 K=2", r"blend_kernel<false, 2, 2>"),
    ("blend S=2 K=3", r"blend_kernel<false, 2, 3>"),
    ("blend S=2 K=4", r"blend_kernel<false, 2, 4>"),
    ("blend generic re-read", r"blend_kernel<true, 0, 0>"),
    ("blend generic in-register (in place)", r"blend_kernel<false, 0, 0>"),
    ("sample_combine vector", r"sample_combine_kernel<[^,]+, (2|4|8)>"),
    ("sample_combine scalar", r"sample_combine_kernel<[^,]+, 1>"),
    ("samplewise_linear blend of partials", r"blend_partials_kernel"),
    ("samplewise_lora per-sample scaling", r"samplewise_lora_scale_kernel"),
    ("samplewise_depthwise_conv2d mix", r"depthwise_mix_kernel"),
    ("samplewise_depthwise_conv2d outputs", r"depthwise_conv_kernel"),
]

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}
CASES: list[str] = []


def check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite output")
    err = ((got - want).abs() / (want.abs() + 1)).max().item() if want.numel() else 0.0
    if err > TOL[dtype]:
        raise AssertionError(f"{name}: relative error {err:.3g} > {TOL[dtype]:g}")
    CASES.append(name)


def misaligned(shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """A contiguous-strided tensor whose storage starts one element past a 16-byte boundary."""
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(n + 1, generator=gen).to(dtype=dtype, device=device)
    return base[1:].view(shape)


def entropy_cases(device: str, gen: torch.Generator) -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for C in (1000, 4096 + 37):  # warp-per-row kernel, block-per-row kernel
            R = 67  # not a multiple of the 8 rows per warp block
            x = (torch.randn(R, C, generator=gen) * 3).to(dtype=dtype, device=device)
            views = {
                "aligned": x,
                "misaligned rows": misaligned((R, C - 3), dtype, device, gen),
                "column view": x[:, 1:],  # every row starts one element later
                "class stride 2": x[:, ::2],
            }
            for label, v in views.items():
                check(
                    f"softmax_entropy C={C} {label} {dtype}",
                    ops.softmax_entropy(v, 0.9),
                    entropy_reference(v.double().cpu(), 0.9),
                    dtype,
                )


def entropy_coefficients_cases(device: str, gen: torch.Generator) -> None:
    for C in (1000, 5000):
        logits = torch.randn(2, 33, C, generator=gen).to(device)
        for offset in (False, True):
            coef, ent = ops.entropy_coefficients(logits, [0.9576, 0.9733], offset)
            want = torch.stack([entropy_reference(logits[m].double().cpu(), t) for m, t in enumerate((0.9576, 0.9733))])
            check(f"entropy_coefficients C={C} offset={offset} entropies", ent, want, torch.float32)
            if not offset:
                w = torch.softmax(-want, dim=0).t()
                check(f"entropy_coefficients C={C} coefficients", coef, w, torch.float32)
            elif not torch.isfinite(coef.double().cpu()).all():
                raise AssertionError(f"entropy_coefficients C={C} offset=True: non-finite coefficients")


def blend_flat(sources: list[list[torch.Tensor]], coef: torch.Tensor, out: list[list[torch.Tensor]]) -> None:
    """blend_ with the op's flat layout: sources[s][n] -> [s * N + n], out[k][n] -> [k * N + n]."""
    ops.blend_([t for src in sources for t in src], coef, [t for o in out for t in o])


def blend_cases(device: str, gen: torch.Generator) -> None:
    shapes = [(70000,), (33, 7), (3,)]  # two chunks + a tail; a small odd tensor; shorter than one vector
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for S, K in ((2, 1), (2, 2), (2, 3), (2, 4), (3, 2)):
            srcs = [[torch.randn(s, generator=gen).to(dtype=dtype, device=device) for s in shapes] for _ in range(S)]
            coef = torch.rand(K, S, generator=gen, dtype=torch.float64)
            out = [[torch.empty(s, dtype=dtype, device=device) for s in shapes] for _ in range(K)]
            blend_flat(srcs, coef, out)
            for k in range(K):
                for n, s in enumerate(shapes):
                    want = sum(coef[k, j] * srcs[j][n].double().cpu() for j in range(S))
                    check(f"blend S={S} K={K} {s} {dtype}", out[k][n], want, dtype)
        # Misaligned sources and outputs: the element-by-element path (S = 2 specialisation and generic).
        for S, K in ((2, 2), (3, 1)):
            srcs = [[misaligned(s, dtype, device, gen) for s in shapes] for _ in range(S)]
            coef = torch.rand(K, S, generator=gen, dtype=torch.float64)
            out = [[misaligned(s, dtype, device, gen) for s in shapes] for _ in range(K)]
            blend_flat(srcs, coef, out)
            for k in range(K):
                for n, s in enumerate(shapes):
                    want = sum(coef[k, j] * srcs[j][n].double().cpu() for j in range(S))
                    check(f"blend misaligned S={S} K={K} {s} {dtype}", out[k][n], want, dtype)
        # In place (output 0 is source 0): the generic in-register path for S = 3.
        srcs = [[torch.randn(s, generator=gen).to(dtype=dtype, device=device) for s in shapes] for _ in range(3)]
        before = [[t.double().cpu().clone() for t in src] for src in srcs]  # .double() of fp64 is no copy
        coef = torch.rand(1, 3, generator=gen, dtype=torch.float64)
        blend_flat(srcs, coef, [srcs[0]])
        for n, s in enumerate(shapes):
            want = sum(coef[0, j] * before[j][n] for j in range(3))
            check(f"blend in place S=3 K=1 {s} {dtype}", srcs[0][n], want, dtype)


def sample_combine_cases(device: str, gen: torch.Generator) -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for N in (64, 67):  # vector path, scalar path
            x = torch.randn(5, 7, 3, N, generator=gen).to(dtype=dtype, device=device)
            w = torch.rand(5, 3, generator=gen).to(device)
            want = torch.einsum("bmsn,bs->bmn", x.double().cpu(), w.double().cpu())
            check(f"sample_combine N={N} {dtype}", ops.sample_combine(x, w), want, dtype)


def samplewise_linear_cases(device: str, gen: torch.Generator) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for with_bias in (True, False):
            x = torch.randn(4, 9, 40, generator=gen).to(dtype=dtype, device=device)
            w = torch.randn(3, 24, 40, generator=gen).to(dtype=dtype, device=device)
            b = torch.randn(3, 24, generator=gen).to(dtype=dtype, device=device) if with_bias else None
            c = torch.rand(4, 3, generator=gen).to(device)
            wd, xd, cd = w.double().cpu(), x.double().cpu(), c.double().cpu()
            merged = torch.einsum("bg,gnk->bnk", cd, wd)
            want = torch.einsum("bmk,bnk->bmn", xd, merged)
            if b is not None:
                want = want + (cd @ b.double().cpu())[:, None, :]
            with torch.no_grad():
                got = ops.samplewise_linear(x, w, b, c)
            check(f"samplewise_linear bias={with_bias} {dtype}", got, want, dtype)


def samplewise_lora_cases(device: str, gen: torch.Generator) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for with_base in (True, False):
            x = torch.randn(4, 9, 40, generator=gen).to(dtype=dtype, device=device)
            a = torch.randn(2, 5, 40, generator=gen).to(dtype=dtype, device=device)
            bm = torch.randn(2, 24, 5, generator=gen).to(dtype=dtype, device=device)
            c = torch.rand(4, 2, generator=gen).to(device)
            w = torch.randn(24, 40, generator=gen).to(dtype=dtype, device=device) if with_base else None
            xd, ad, bd, cd = x.double().cpu(), a.double().cpu(), bm.double().cpu(), c.double().cpu()
            want = torch.einsum("bs,sor,sri,bmi->bmo", cd, bd, ad, xd)
            if w is not None:
                want = want + xd @ w.double().cpu().t()
            with torch.no_grad():
                got = ops.samplewise_lora(x, a, bm, c, w)
            check(f"samplewise_lora base={with_base} {dtype}", got, want, dtype)


def samplewise_depthwise_cases(device: str, gen: torch.Generator) -> None:
    from dawin_ext.testing.reference_ops import samplewise_depthwise_conv2d_reference

    for dtype in (torch.float32, torch.float16):
        geometries = (((3, 40, 2, 2), 7, [1, 1], [3, 3], [1, 1]), ((2, 17, 9, 11), 3, [2, 1], [1, 2], [1, 2]))
        for with_bias, (shape, k, stride, padding, dilation) in zip((True, False), geometries, strict=True):
            x = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
            w = (torch.randn(2, shape[1], 1, k, k, generator=gen) / k).to(dtype=dtype, device=device)
            b = torch.randn(2, shape[1], generator=gen).to(dtype=dtype, device=device) if with_bias else None
            c = torch.rand(shape[0], 2, generator=gen).to(device)
            want = samplewise_depthwise_conv2d_reference(
                x.double().cpu(),
                w.double().cpu(),
                c.double().cpu(),
                b if b is None else b.double().cpu(),
                stride,
                padding,
                dilation,
            )
            with torch.no_grad():
                got = ops.samplewise_depthwise_conv2d(x, w, b, c, stride, padding, dilation)
            check(f"samplewise_depthwise_conv2d bias={with_bias} {dtype}", got, want, dtype)


def run_all(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    entropy_cases(device, gen)
    entropy_coefficients_cases(device, gen)
    blend_cases(device, gen)
    sample_combine_cases(device, gen)
    samplewise_linear_cases(device, gen)
    samplewise_lora_cases(device, gen)
    samplewise_depthwise_cases(device, gen)
    if device == "cuda":
        torch.cuda.synchronize()


def kernels_that_ran(device: str) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    # On the CPU (a rehearsal of this code) the names are the ops', and no KERNEL_PATHS match.
    with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
        run_all(device)
    return sorted({e.key for e in prof.key_averages()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--coverage", action="store_true", help="list the kernels that ran and check KERNEL_PATHS")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize_cases.py: no CUDA device visible", file=sys.stderr)
        return 2
    if args.coverage:
        names = kernels_that_ran(args.device)
        ours = [n for n in names if "dawin_ext" in n]
        print(f"{len(ours)} dawin_ext kernel instances ran:")
        for n in ours:
            print("   ", n)
        missing = [label for label, pattern in KERNEL_PATHS if not any(re.search(pattern, n) for n in ours)]
        print(f"{len(CASES)} cases passed their float64 checks on {args.device}")
        if missing:
            print(f"coverage: MISSING {len(missing)} of {len(KERNEL_PATHS)} kernel paths: {'; '.join(missing)}")
            return 1
        print(f"coverage: all {len(KERNEL_PATHS)} kernel paths ran")
        return 0
    run_all(args.device)
    print(f"gpu_sanitize_cases.py: {len(CASES)} cases passed their float64 checks on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
