"""One compiled op at ViT-B-32's layer shapes from a given build of the extension, for A/B runs between builds.

    python benchmarks/layer_ab.py linear path/to/_C.so LABEL [IN OUT]
    python benchmarks/layer_ab.py lora path/to/_C.so LABEL

Loads only the shared library (``torch.ops.load_library``), so two builds of different commits can alternate in
separate processes: ``for i in 1 2 3; do python benchmarks/layer_ab.py linear A.so a; python benchmarks/layer_ab.py
linear B.so b; done``. 1 thread; prints the minimum over the timed calls (the least disturbed one on a shared VM).

``linear``: ``samplewise_linear`` at batch 64 x 50 rows, S = 2, weights in the ``[S, IN, OUT]`` storage the engine
keeps (default IN x OUT: 3072 x 768, the MLP output layer). ``lora``: ``samplewise_lora`` (S = 2 adapters, rank 16,
weight + bias) against a plain ``F.linear`` on 768->768, 768->3072 and 3072->768.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

B, M, S, RANK, CALLS = 64, 50, 2, 16, 12


def _min_ms(fn) -> float:
    times = []
    for _ in range(CALLS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def linear(label: str, n_in: int, n_out: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, M, n_in, generator=g)
    w = torch.randn(S, n_in, n_out, generator=g).transpose(1, 2)  # [S, OUT, IN], unit stride along OUT
    b, c = torch.randn(S, n_out, generator=g), torch.rand(B, S, generator=g)
    ms = _min_ms(lambda: torch.ops.dawin_ext.samplewise_linear(x, w, b, c))
    print(f"{label} samplewise_linear {n_in}x{n_out}: min {ms:.1f} ms")


def lora(label: str) -> None:
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in [(768, 768), (768, 3072), (3072, 768)]:
        x = torch.randn(B, M, n_in, generator=g)
        w, bias = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g)
        a = torch.randn(S, RANK, n_in, generator=g)
        b = torch.randn(S, RANK, n_out, generator=g).transpose(1, 2)  # [S, OUT, R] view of the [S, R, OUT] layout
        c = torch.rand(B, S, generator=g)
        w_in_out = w.t().contiguous().t()  # stride(0) == 1: the base GEMM's brgemm path, as the engine stores it
        ours = _min_ms(partial(torch.ops.dawin_ext.samplewise_lora, x, a, b, c, w_in_out, bias))
        plain = _min_ms(partial(F.linear, x, w, bias))
        print(
            f"{label} samplewise_lora {n_in}x{n_out}: {ours:.1f} ms, plain F.linear {plain:.1f} ms, {ours / plain:.2f}x"
        )


if __name__ == "__main__":
    op, so, label = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.ops.load_library(so)
    torch.set_num_threads(1)
    if op == "linear":
        linear(label, *(int(v) for v in sys.argv[4:6]) if len(sys.argv) > 5 else (3072, 768))
    elif op == "lora":
        lora(label)
    else:
        raise SystemExit(f"layer_ab: unknown op {op!r} (linear or lora)")
