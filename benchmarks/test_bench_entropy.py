"""pytest-benchmark suites: softmax_entropy (and entropy_coefficients) against the reference entropy.

Run: python -m pytest benchmarks/test_bench_entropy.py --benchmark-only --benchmark-group-by=param:shape
Each shape is measured for the reference and for dawin_ext in the same run, so their medians can
be compared. On CUDA the timed function synchronizes, so the figures are wall times of finished work.
"""

from __future__ import annotations

import pytest
import torch

import dawin_ext
from dawin_ext.testing.reference_ops import coefficient_reference, entropy_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [(1024, 1000), (4096, 1000), (16384, 1000)]


def _synced(call, device: str):
    """The timed body: ``call()`` and then, on CUDA, a synchronize, so the time is the kernel's, not its launch's."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        out = call()
        sync()
        return out

    return run


def _logits(shape, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["reference", "dawin_ext"])
def test_softmax_entropy(benchmark, impl, shape, device):
    x = _logits(shape, device)
    fn = entropy_reference if impl == "reference" else dawin_ext.softmax_entropy
    run = _synced(lambda: fn(x, 0.9576), device)

    benchmark.group = f"softmax_entropy {device} {shape[0]}x{shape[1]} fp32"
    benchmark.extra_info.update(bytes_read=x.numel() * x.element_size(), cpu_isa=_cpu_isa())
    out = benchmark(run)
    torch.testing.assert_close(out.cpu(), entropy_reference(x.double(), 0.9576).float().cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", ["reference", "dawin_ext"])
def test_softmax_entropy_reduced_precision(benchmark, impl, dtype, device):
    x = _logits((4096, 1000), device, dtype)
    # The reference promotes to fp32 first, as a user would for an fp32-accumulated entropy.
    fn = (lambda t, temp: entropy_reference(t.float(), temp)) if impl == "reference" else dawin_ext.softmax_entropy
    run = _synced(lambda: fn(x, 1.0), device)

    benchmark.group = f"softmax_entropy {device} 4096x1000 {dtype}"
    benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "dawin_ext"])
def test_entropy_coefficients(benchmark, impl, device):
    zs, ft = _logits((4096, 1000), device), _logits((4096, 1000), device) * 1.5
    temps = (0.9576, 0.9733)
    if impl == "reference":
        run = _synced(lambda: coefficient_reference(zs, ft, temps), device)
    else:
        stacked = torch.stack([zs, ft])
        run = _synced(lambda: dawin_ext.entropy_coefficients(stacked, temps).coefficients[:, 1], device)

    benchmark.group = f"entropy_coefficients {device} M=2 4096x1000"
    benchmark(run)


def _cpu_isa() -> str:
    return str(torch.ops.dawin_ext._cpu_isa())
