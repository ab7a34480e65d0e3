"""softmax_entropy and entropy_coefficients against float64 references, on every device and dtype.

The float64 reference works on the same (already rounded) inputs as the kernel, so the tolerances
measure the kernel's fp32 accumulation only; they are per dtype because the temperature scaling of
fp16/bf16 inputs and the backward's cast back to the input dtype round differently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES

import dawin_ext
from dawin_ext.testing.reference_ops import coefficient_reference, entropy_reference

TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 3e-5, "rtol": 3e-5},
    torch.bfloat16: {"atol": 3e-5, "rtol": 3e-5},
}
OPS = ["softmax_entropy", "entropy_coefficients", "blend_", "sample_combine", "samplewise_linear"]


def entropy64(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Float64 entropy that treats p = 0 terms (from -inf logits) as 0, like the kernel."""
    logp = torch.log_softmax(x.double() / temperature, dim=-1)
    p = logp.exp()
    # masked_fill rather than where(p > 0, ...): NaN stays NaN, and autograd gives 0 (not NaN) at -inf.
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def make(shape, dtype, device, scale=3.0, gen=None):
    return (torch.randn(shape, dtype=torch.float64, generator=gen) * scale).to(dtype).to(device)


def assert_entropy_close(got, x, temperature, dtype):
    want = entropy64(x.cpu(), temperature)
    assert got.dtype == torch.float32
    assert got.shape == x.shape[:-1]
    torch.testing.assert_close(got.cpu().double(), want, equal_nan=True, **TOL[dtype])


# ----------------------------------------------------------------------------------------------
# softmax_entropy: values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape", [(0, 5), (1, 1), (1, 3), (7, 3), (64, 1000), (5, 1001), (2, 3, 37), (40,), (2, 0, 9), (1, 100003)]
)
@pytest.mark.parametrize("temperature", [1.0, 0.37, 2.5])
def test_matches_float64(device, dtype, shape, temperature):
    x = make(shape, dtype, device)
    assert_entropy_close(dawin_ext.softmax_entropy(x, temperature), x, temperature, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_long_rows_split_across_threads(device, dtype):
    # Several rows of 100003 classes: the CPU kernel splits each row into chunks merged afterwards.
    x = make((3, 100003), dtype, device, scale=5.0)
    x[1, 77777] = 60.0  # max in a late chunk: earlier chunks must be rescaled
    assert_entropy_close(dawin_ext.softmax_entropy(x, 0.9), x, 0.9, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_huge_logits(device, dtype, magnitude):
    x = make((16, 257), dtype, device, scale=1.0)
    x = (x * abs(magnitude) if magnitude > 0 else x + magnitude).to(dtype)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x[0] = magnitude  # constant row: uniform distribution, H = log C
    assert_entropy_close(dawin_ext.softmax_entropy(x), x, 1.0, dtype)
    assert abs(dawin_ext.softmax_entropy(x[0]).item() - torch.log(torch.tensor(257.0)).item()) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_maxima_further_apart_than_the_float_range(device, dtype):
    """Partial states with maxima -3e38 and 3e38 must merge to the right entropy, not NaN.

    Their difference, -6e38, overflows to -inf in fp32, so the rescale factor exp(-inf) is 0 and the
    rescaled t term would be 0 * (-inf) = NaN. Rows longer than the CPU kernel's split length
    (32768) are cut into chunks whose states are merged; the first chunk here holds only -3e38 and a
    later one holds k entries of 3e38, so every other entry has probability 0 and H = log k. The
    same row as a single block (short rows) was right already and is checked alongside.
    """
    k = 5
    C = 3 * 32768 + 7
    x = torch.full((4, C), -3e38, dtype=torch.float64)
    x[0, 40000 : 40000 + k] = 3e38  # max in the second chunk, first chunk all -3e38
    x[1, -k:] = 3e38  # max in the last (partial) chunk
    x[2, 40000:] = torch.randn(C - 40000, dtype=torch.float64)  # second chunk finite, first -3e38: no overflow
    x[2, 50000 : 50000 + k] = 3e38
    x[3, :k] = 3e38  # max first, then chunks of only -3e38: the other direction of the merge
    x = x.to(dtype).to(device)
    got = dawin_ext.softmax_entropy(x).cpu()
    want = torch.full((4,), torch.log(torch.tensor(float(k))).item(), dtype=torch.float64)
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), entropy64(x.cpu()), atol=1e-5, rtol=1e-5)
    # A short row with both values in one block.
    short = torch.tensor([[-3e38] * 7 + [3e38] * k], dtype=dtype, device=device)
    assert abs(dawin_ext.softmax_entropy(short).item() - want[0].item()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_neg_inf_entries_and_one_hot_rows(device, dtype):
    x = make((6, 300), dtype, device)
    x[0, ::3] = float("-inf")  # some -inf entries
    x[1] = float("-inf")
    x[1, 123] = 2.0  # one finite entry: one-hot distribution, H = 0
    x[2] = torch.nn.functional.one_hot(torch.tensor(7), 300).to(dtype) * 1e4  # one-hot logits
    x[3, :299] = float("-inf")  # only the last (tail) element finite
    x[4, 0] = float("-inf")  # first element -inf
    got = dawin_ext.softmax_entropy(x)
    assert_entropy_close(got, x, 1.0, dtype)
    assert torch.isfinite(got).all()
    assert got[1].item() == 0.0 and got[3].item() == 0.0
    assert 0.0 <= got[2].item() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_undefined_rows_give_nan(device, dtype):
    """All -inf rows have no softmax distribution; NaN or +inf entries make the entropy undefined.

    Documented behaviour: those rows give NaN, and only those rows.
    """
    x = make((5, 1000), dtype, device)
    x[0] = float("-inf")
    x[1, 500] = float("nan")
    x[2, 999] = float("nan")  # NaN in the scalar tail
    x[3, 3] = float("inf")
    got = dawin_ext.softmax_entropy(x).cpu()
    assert torch.isnan(got[:4]).all(), got
    assert torch.isfinite(got[4])
    torch.testing.assert_close(got[4].double(), entropy64(x[4].cpu()), **TOL[dtype])
    # PyTorch agrees that these rows are undefined.
    assert torch.isnan(entropy64(x[:4].cpu())).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_and_misaligned_views(device, dtype):
    base = make((33, 2 * 515 + 1), dtype, device)
    views = {
        "columns_step2": base[:, 1::2],
        "transposed": make((515, 33), dtype, device).t(),
        "offset_by_one": base.flatten()[1 : 1 + 33 * 1000].view(33, 1000),
        "row_slice": base[3:20, 7:600],
        "expanded": make((1, 700), dtype, device).expand(4, 700),
        "3d_permuted": make((9, 4, 6), dtype, device).permute(2, 0, 1),
    }
    for name, v in views.items():
        got = dawin_ext.softmax_entropy(v, 0.8)
        assert_entropy_close(got, v, 0.8, dtype), name


def test_matches_public_reference_formula():
    x = torch.randn(128, 1000) * 2
    torch.testing.assert_close(dawin_ext.softmax_entropy(x, 0.9576), entropy_reference(x, 0.9576), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors(device):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        dawin_ext.softmax_entropy(torch.randn(2, 3, device=device), 0.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        dawin_ext.softmax_entropy(torch.randn(2, 3, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one dimension"):
        dawin_ext.softmax_entropy(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match="must not be empty"):
        dawin_ext.softmax_entropy(torch.randn(2, 0, device=device))


def test_inputs_not_mutated():
    x = torch.randn(8, 100)
    x[0, 0] = float("-inf")
    before = x.clone()
    dawin_ext.softmax_entropy(x, 0.5)
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------------------------
# softmax_entropy: gradient
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradient_matches_float64_autograd(device, temperature):
    """The kernels take fp32/fp16/bf16 only (accumulation is fp32 by design), so a finite-difference
    gradcheck in double cannot be run on the op itself. Instead the fp32 op's autograd gradient is
    compared with the gradient that autograd computes in float64 through the plain-PyTorch entropy,
    and the float64 reference itself passes torch.autograd.gradcheck."""
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(6, 4, 50, dtype=torch.float64, generator=gen)
    x64[0, 0, :10] = float("-inf")
    g = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    x64.requires_grad_(True)
    entropy64(x64, temperature).backward(g)
    x32 = x64.detach().float().to(device).requires_grad_(True)
    dawin_ext.softmax_entropy(x32, temperature).backward(g.float().to(device))
    assert x32.grad.dtype == torch.float32
    torch.testing.assert_close(x32.grad.cpu().double(), x64.grad, atol=2e-5, rtol=1e-4)
    assert (x32.grad[0, 0, :10] == 0).all()


def test_reference_gradcheck_in_double():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: entropy64(t, 0.7), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradient_reduced_precision(device, dtype):
    x = make((4, 33), dtype, device).requires_grad_(True)
    dawin_ext.softmax_entropy(x).sum().backward()
    assert x.grad.dtype == dtype
    x64 = x.detach().cpu().double().requires_grad_(True)
    entropy64(x64).sum().backward()
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------------
# entropy_coefficients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 2, 5])
def test_coefficients_softmax_of_negative_entropy(device, dtype, M):
    temps = [0.9 + 0.1 * m for m in range(M)]
    logits = make((M, 31, 100), dtype, device)
    res = dawin_ext.entropy_coefficients(logits, temps)
    h64 = torch.stack([entropy64(logits[m].cpu(), temps[m]) for m in range(M)])
    torch.testing.assert_close(res.entropies.cpu().double(), h64, **TOL[dtype])
    want = torch.softmax(-h64, dim=0).t()
    assert res.coefficients.shape == (31, M)
    torch.testing.assert_close(res.coefficients.cpu().double(), want, atol=1e-5, rtol=1e-5)
    # The same kernel as softmax_entropy with that model's temperature.
    for m in range(M):
        torch.testing.assert_close(res.entropies[m], dawin_ext.softmax_entropy(logits[m], temps[m]), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset_adjustment", [False, True])
def test_coefficients_match_dawin_reference(device, offset_adjustment):
    gen = torch.Generator().manual_seed(3)
    zs = torch.randn(257, 1000, generator=gen) * 2
    ft = torch.randn(257, 1000, generator=gen) * 4
    temps = (0.9576, 0.9733)  # ViT-B/32 reference temperatures
    want = coefficient_reference(zs.double(), ft.double(), temps, offset_adjustment)
    stacked = dawin_ext.entropy_coefficients(torch.stack([zs, ft]).to(device), temps, offset_adjustment)
    listed = dawin_ext.entropy_coefficients([zs.to(device), ft.to(device)], temps, offset_adjustment)
    torch.testing.assert_close(stacked.coefficients, listed.coefficients, atol=0, rtol=0)
    torch.testing.assert_close(stacked.entropies, listed.entropies, atol=0, rtol=0)
    torch.testing.assert_close(stacked.coefficients[:, 1].cpu().double(), want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(stacked.coefficients.sum(1).cpu(), torch.ones(257), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_coefficients_edge_cases(device):
    empty = dawin_ext.entropy_coefficients(torch.randn(2, 0, 10, device=device))
    assert empty.coefficients.shape == (0, 2) and empty.entropies.shape == (2, 0)
    one = dawin_ext.entropy_coefficients(torch.randn(2, 1, 3, device=device), [1.0, 2.0])
    assert one.coefficients.shape == (1, 2)
    nan_logits = torch.randn(2, 4, 10, device=device)
    nan_logits[1, 2, 5] = float("nan")
    res = dawin_ext.entropy_coefficients(nan_logits)
    assert torch.isnan(res.coefficients[2]).all() and torch.isfinite(res.coefficients[[0, 1, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_coefficients_errors(device):
    x = torch.randn(3, 4, 5, device=device)
    with pytest.raises(ValueError, match="got 2 temperatures for 3 models"):
        dawin_ext.entropy_coefficients(x, [1.0, 1.0])
    with pytest.raises(ValueError, match="offset_adjustment is defined for exactly 2 models"):
        dawin_ext.entropy_coefficients(x, offset_adjustment=True)
    with pytest.raises(ValueError, match="at least 2 samples"):
        dawin_ext.entropy_coefficients(x[:2, :1], offset_adjustment=True)
    with pytest.raises(ValueError, match="temperature of model 1"):
        dawin_ext.entropy_coefficients(x, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[M models, B samples, C classes\]"):
        dawin_ext.entropy_coefficients(x[0])
    with pytest.raises(ValueError, match="different shapes"):
        dawin_ext.entropy_coefficients([x[0], x[1, :2]])


# ----------------------------------------------------------------------------------------------
# registration, opcheck, CPU instruction sets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = make((6, 40), torch.float32, device)
    torch.library.opcheck(torch.ops.dawin_ext.softmax_entropy.default, (x, 0.8))
    torch.library.opcheck(torch.ops.dawin_ext.softmax_entropy.default, (x.clone().requires_grad_(True), 1.3))
    torch.library.opcheck(torch.ops.dawin_ext.softmax_entropy.default, (make((2, 3, 5), torch.bfloat16, device), 1.0))
    logits = make((2, 6, 40), torch.float16, device)
    torch.library.opcheck(torch.ops.dawin_ext.entropy_coefficients.default, (logits, [0.9, 1.1], False))
    torch.library.opcheck(torch.ops.dawin_ext.entropy_coefficients.default, (logits, [], True))


def test_cuda_kernels_registered_in_cuda_builds():
    if not dawin_ext.build_info()["with_cuda"]:
        pytest.skip("CPU-only build of dawin_ext")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dawin_ext::{op}", "CUDA"), op


_ISA_SCRIPT = textwrap.dedent(
    """
    import torch, dawin_ext
    isa = torch.ops.dawin_ext._cpu_isa()
    cap = torch.backends.cpu.get_cpu_capability()
    cap = {"NO AVX": "DEFAULT"}.get(cap, cap)  # torch 2.6 names the baseline "NO AVX"
    assert isa == cap, (isa, cap)
    def h64(x):
        logp = torch.log_softmax(x.double(), -1); p = logp.exp()
        return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((9, 1), (9, 3), (33, 1000), (2, 100003)):
            x = (torch.randn(shape) * 4).to(dtype)
            x[0, 0] = float("-inf")
            x[1, -1] = float("nan")
            x[min(2, shape[0] - 1), shape[1] // 2] = float("inf")
            for v in (x, x[:, 1:] if shape[1] > 1 else x, x.t().contiguous().t()):
                got = dawin_ext.softmax_entropy(v).double()
                torch.testing.assert_close(got, h64(v), atol=3e-5, rtol=3e-5, equal_nan=True)
        s = torch.randn(3, 2, 4, 1003).to(dtype); w = torch.randn(3, 4)
        want = torch.einsum("bmsn,bs->bmn", s.double(), w.double())
        torch.testing.assert_close(dawin_ext.sample_combine(s, w).double(), want, atol=5e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2 if dtype != torch.float32 else 1e-5)
    # samplewise_linear's fp32 weight mixing (odd block tails: K = 389 > one K block, N = 67)
    x = torch.randn(3, 5, 389); wts = torch.randn(3, 67, 389) / 20; bs = torch.randn(3, 67); c = torch.randn(3, 3)
    merged = torch.einsum("bg,gnk->bnk", c.double(), wts.double())
    want = torch.einsum("bmk,bnk->bmn", x.double(), merged) + (c.double() @ bs.double())[:, None]
    torch.testing.assert_close(dawin_ext.samplewise_linear(x, wts, c, bs).double(), want, atol=1e-4, rtol=1e-4)
    print(isa)
    """
)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_each_cpu_instruction_set(capability):
    """Every compiled copy of the CPU kernels (baseline, AVX2, AVX512) is checked, in a subprocess
    where ATEN_CPU_CAPABILITY caps the instruction set; the kernels follow torch's own choice."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    isa = out.stdout.strip().splitlines()[-1]
    if capability == "default":
        assert isa == "DEFAULT"
    elif isa != capability.upper():
        pytest.skip(f"this CPU runs {isa} when {capability} is requested")
