"""sample_combine against a float64 einsum, on every device and dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES

import dawin_ext
from dawin_ext.testing.reference_ops import sample_combine_reference

# The kernel accumulates in fp32 and rounds once to the output dtype.
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 1e-3},
    torch.bfloat16: {"atol": 1e-2, "rtol": 8e-3},
}


def combine64(stacked, weights):
    return torch.einsum("bmsn,bs->bmn", stacked.double().cpu(), weights.double().cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape", [(0, 2, 2, 8), (1, 1, 1, 1), (1, 2, 3, 7), (3, 2, 2, 1000), (2, 3, 5, 1003), (5, 1, 9, 4096)]
)
def test_matches_float64(device, dtype, shape):
    stacked = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    weights = torch.softmax(torch.randn(shape[0], shape[2], dtype=torch.float64), -1).float().to(device)
    got = dawin_ext.sample_combine(stacked, weights)
    assert got.dtype == dtype and got.shape == (shape[0], shape[1], shape[3])
    torch.testing.assert_close(got.cpu().double(), combine64(stacked, weights), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_misaligned_and_weight_dtypes(device, dtype):
    base = torch.randn(2 * 3 * 4 * 65 + 1, dtype=torch.float64).to(dtype).to(device)
    cases = {
        "offset_by_one": base[1:].view(2, 3, 4, 65),
        "permuted": torch.randn(4, 2, 65, 3, dtype=torch.float64).to(dtype).to(device).permute(1, 3, 0, 2),
        "strided_n": torch.randn(2, 3, 4, 130, dtype=torch.float64).to(dtype).to(device)[..., ::2],
    }
    for name, stacked in cases.items():
        for wdtype in (torch.float64, torch.float32, torch.float16):
            weights = torch.randn(2, 4, dtype=torch.float64).to(wdtype).to(device)
            got = dawin_ext.sample_combine(stacked, weights)
            torch.testing.assert_close(got.cpu().double(), combine64(stacked, weights.float()), **TOL[dtype]), name


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_and_inputs_not_mutated(device):
    stacked = torch.randn(2, 1, 3, 40, device=device)
    stacked[1, 0, 2, 17] = float("nan")
    weights = torch.rand(2, 3, device=device)
    before = stacked.clone()
    got = dawin_ext.sample_combine(stacked, weights)
    assert torch.isnan(got[1, 0, 17]) and torch.isnan(got).sum() == 1
    assert torch.equal(stacked.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference(device):
    stacked = torch.randn(3, 2, 4, 17, dtype=torch.float64)
    weights = torch.rand(3, 4, dtype=torch.float64)
    g = torch.randn(3, 2, 17, dtype=torch.float64)
    s64, w64 = stacked.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    sample_combine_reference(s64, w64).backward(g)
    s32 = stacked.float().to(device).requires_grad_(True)
    w32 = weights.float().to(device).requires_grad_(True)
    dawin_ext.sample_combine(s32, w32).backward(g.float().to(device))
    torch.testing.assert_close(s32.grad.cpu().double(), s64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w32.grad.cpu().double(), w64.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    s = torch.randn(2, 1, 3, 4, device=device)
    with pytest.raises(ValueError, match=r"stacked must be \[B, M, S, N\]"):
        dawin_ext.sample_combine(s[0], torch.rand(2, 3, device=device))
    with pytest.raises(ValueError, match="does not match"):
        dawin_ext.sample_combine(s, torch.rand(2, 4, device=device))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        dawin_ext.sample_combine(s.double(), torch.rand(2, 3, device=device))
    with pytest.raises(TypeError, match="weights must be floating point"):
        dawin_ext.sample_combine(s, torch.ones(2, 3, device=device, dtype=torch.long))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    s = torch.randn(2, 3, 4, 10, device=device)
    w = torch.rand(2, 4, device=device)
    torch.library.opcheck(torch.ops.dawin_ext.sample_combine.default, (s, w))
    torch.library.opcheck(
        torch.ops.dawin_ext.sample_combine.default, (s.clone().requires_grad_(True), w.clone().requires_grad_(True))
    )
    torch.library.opcheck(torch.ops.dawin_ext.sample_combine.default, (s.half(), w))
