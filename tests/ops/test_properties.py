"""Property tests: each op against the plain-PyTorch reference (dawin_ext/testing/reference_ops.py) in float64.

Hypothesis draws shapes (including empty batches and single classes), dtypes, memory layouts
(contiguous, transposed, sliced with a step, broadcast with stride 0) and coefficient matrices; the
tensors themselves come from a seeded torch generator. 200 examples per op by default;
DAWIN_EXT_PROPERTY_EXAMPLES overrides (the sanitizer run uses fewer).
"""

from __future__ import annotations

import math
import os

import torch
from conftest import FLOAT_DTYPES
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dawin_ext import blend, entropy_coefficients, interpolation, sample_combine, softmax_entropy
from dawin_ext.testing.reference_ops import (
    blend_reference,
    coefficient_reference,
    entropy_reference,
    interpolation_reference,
    sample_combine_reference,
)

EXAMPLES = int(os.environ.get("DAWIN_EXT_PROPERTY_EXAMPLES", "200"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the working tree
    suppress_health_check=[HealthCheck.too_slow],
)

dtypes = st.sampled_from(FLOAT_DTYPES)
layouts = st.sampled_from(["contiguous", "transposed", "sliced", "broadcast"])
seeds = st.integers(0, 2**31 - 1)
# Unit roundoff of the storage dtype (outputs are rounded once to it); finfo.tiny covers underflow.
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


def _randn(shape, gen, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``t`` whose memory layout is ``layout`` (values are preserved exactly)."""
    if layout == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if layout == "transposed":
        # Stored with the last two dims swapped (or reversed for 1-D): a non-contiguous view of t.
        if t.dim() == 1:
            return t.flip(0).contiguous().flip(0)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        # Every other element of a twice-as-long buffer along the last dim.
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "broadcast":
        # Stride 0 along the first dim: all rows of t become the first row.
        return t[:1].expand_as(t) if t.shape[0] > 0 else t
    raise AssertionError(layout)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: torch.Tensor | float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    ok = err <= atol
    assert bool(ok.all()), f"{what}: max error {float(err.max())} exceeds tolerance at {(~ok).nonzero()[0].tolist()}"


# --------------------------------------------------------------------------------------------
# softmax_entropy
# --------------------------------------------------------------------------------------------
@PROPERTY
@given(
    seed=seeds,
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    classes=st.integers(1, 70),
    dtype=dtypes,
    layout=layouts,
    scale=st.sampled_from([1e-3, 1.0, 8.0, 40.0]),
    temperature=st.floats(0.05, 20.0),
)
def test_softmax_entropy_matches_reference(seed, lead, classes, dtype, layout, scale, temperature):
    gen = torch.Generator().manual_seed(seed)
    x = _randn((*lead, classes), gen, scale).to(dtype)
    if x.dim() >= 1 and x.shape[0] > 0:
        x = _with_layout(x, layout)
    got = softmax_entropy(x, temperature)
    assert got.dtype == torch.float32 and got.shape == x.shape[:-1]
    expected = entropy_reference(x.double(), temperature)
    # fp32 evaluation: H = m + log(sum e^(z - m)) - E[z] cancels terms of size |z| = |x| / T, and the
    # rounding grows with log C; measured errors stay below 4 ulps * (1 + |z|max) * (1 + ln C).
    zmax = float(x.double().abs().max()) / temperature if x.numel() else 0.0
    atol = 16 * EPS[torch.float32] * (1 + zmax) * (1 + math.log(classes))
    _close(got, expected, atol, "softmax_entropy")
    assert bool((got >= -1e-6).all()) and bool((got <= torch.log(torch.tensor(float(classes))) + 1e-4).all())


# --------------------------------------------------------------------------------------------
# entropy_coefficients
# --------------------------------------------------------------------------------------------
@PROPERTY
@given(
    seed=seeds,
    models=st.integers(1, 4),
    batch=st.integers(0, 7),
    classes=st.integers(1, 40),
    dtype=dtypes,
    layout=layouts,
    as_list=st.booleans(),
    temps=st.lists(st.floats(0.1, 5.0), min_size=4, max_size=4),
    use_temps=st.booleans(),
)
def test_entropy_coefficients_match_reference(seed, models, batch, classes, dtype, layout, as_list, temps, use_temps):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.stack([_randn((batch, classes), gen, 3.0).to(dtype) for _ in range(models)])
    temps = temps[:models] if use_temps else None
    t = temps if temps is not None else [1.0] * models
    if as_list:
        arg = [_with_layout(z, layout) if batch else z for z in logits]
        logits = torch.stack(arg)  # the values the op sees ("broadcast" repeats row 0)
    else:
        arg = logits
    coefficients, entropies = entropy_coefficients(arg, temps)
    h_ref = torch.stack([entropy_reference(logits[m].double(), t[m]) for m in range(models)])
    _close(entropies, h_ref, 1e-4, "entropies")
    c_ref = torch.softmax(-h_ref, dim=0).t()  # exp(-H_m) / sum_j exp(-H_j)
    _close(coefficients, c_ref, 1e-5, "coefficients")
    if batch:
        _close(coefficients.sum(1), torch.ones(batch, dtype=torch.float64), 1e-5, "row sums")
    if models == 2:
        lam = coefficient_reference(logits[0].double(), logits[1].double(), tuple(t))
        _close(coefficients[:, 1], lam, 1e-5, "lambda")


@PROPERTY
@given(
    seed=seeds,
    batch=st.integers(2, 9),
    classes=st.integers(2, 30),
    dtype=dtypes,
    temps=st.tuples(st.floats(0.3, 3.0), st.floats(0.3, 3.0)),
)
def test_offset_adjustment_matches_reference(seed, batch, classes, dtype, temps):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.stack([_randn((batch, classes), gen, 2.0).to(dtype) for _ in range(2)])
    h = torch.stack([entropy_reference(logits[m].double(), temps[m]) for m in range(2)])
    # b divides by the mean entropy: keep away from (nearly) one-hot batches where that is ill-posed.
    assume(bool((h.mean(1) > 1e-2).all()))
    coefficients, _ = entropy_coefficients(logits, list(temps), offset_adjustment=True)
    lam = coefficient_reference(logits[0].double(), logits[1].double(), temps, offset_adjustment=True)
    _close(coefficients[:, 1], lam, 1e-4, "offset lambda")
    _close(coefficients[:, 0], 1 - lam, 1e-4, "offset 1 - lambda")


# --------------------------------------------------------------------------------------------
# blend / interpolation
# --------------------------------------------------------------------------------------------
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
coefficient_values = st.one_of(st.sampled_from([0.0, 1.0, 0.5, -1.0]), st.floats(-2.0, 2.0, width=32))


@st.composite
def blend_problems(draw):
    n_sources = draw(st.integers(1, 4))
    n_clusters = draw(st.integers(1, 18))  # > 16 crosses the per-launch cluster limit
    key_shapes = draw(st.lists(shapes, min_size=1, max_size=4))
    key_dtypes = draw(st.lists(dtypes, min_size=len(key_shapes), max_size=len(key_shapes)))
    key_layouts = draw(st.lists(layouts, min_size=len(key_shapes), max_size=len(key_shapes)))
    coef = draw(
        st.lists(
            st.lists(coefficient_values, min_size=n_sources, max_size=n_sources),
            min_size=n_clusters,
            max_size=n_clusters,
        )
    )
    return n_sources, key_shapes, key_dtypes, key_layouts, coef, draw(st.booleans()), draw(seeds)


@PROPERTY
@given(problem=blend_problems())
def test_blend_matches_reference(problem):
    n_sources, key_shapes, key_dtypes, key_layouts, coef, use_out, seed = problem
    gen = torch.Generator().manual_seed(seed)
    sources = []
    for _ in range(n_sources):
        sd = {}
        for i, (shape, dtype, layout) in enumerate(zip(key_shapes, key_dtypes, key_layouts, strict=True)):
            t = _randn(shape, gen).to(dtype)
            sd[f"k{i}"] = _with_layout(t, layout) if t.dim() and t.shape[0] else t
        sd["count"] = torch.randint(0, 100, (3,), generator=gen)  # integer buffer: copied from source 0
        sources.append(sd)
    out = None
    if use_out:
        out = [{k: torch.full(v.shape, float("nan")).to(v.dtype) for k, v in sources[0].items()} for _ in coef]
        for od in out:
            od["count"] = torch.zeros(3, dtype=torch.long)
    result = blend(sources, coef, out=out)
    if use_out:
        assert result is out or all(r is o for r, o in zip(result, out, strict=True))
    expected = blend_reference([{k: v.double() for k, v in sd.items()} for sd in sources], coef)
    c = torch.tensor(coef, dtype=torch.float64)
    for k_row, (got, exp) in enumerate(zip(result, expected, strict=True)):
        assert got.keys() == sources[0].keys()
        assert torch.equal(got["count"], sources[0]["count"])
        for key, dtype in zip(got.keys(), key_dtypes, strict=False):
            assert got[key].dtype == dtype and got[key].is_contiguous()
            # fp32 accumulation, one rounding to the storage dtype.
            magnitude = sum(abs(float(c[k_row, s])) * sources[s][key].double().abs() for s in range(n_sources))
            atol = (EPS[dtype] + 4 * n_sources * EPS[torch.float32]) * magnitude + torch.finfo(dtype).tiny
            _close(got[key], exp[key], atol, f"blend row {k_row} key {key} ({dtype})")


@PROPERTY
@given(seed=seeds, shape=shapes, dtype=dtypes, alpha=coefficient_values)
def test_interpolation_matches_reference(seed, shape, dtype, alpha):
    gen = torch.Generator().manual_seed(seed)
    w1 = {"w": _randn(shape, gen).to(dtype), "b": _randn((3,), gen).to(dtype)}
    w2 = {"w": _randn(shape, gen).to(dtype), "b": _randn((3,), gen).to(dtype)}
    got = interpolation(alpha, w1, w2)
    exp = interpolation_reference(alpha, {k: v.double() for k, v in w1.items()}, {k: v.double() for k, v in w2.items()})
    for key in w1:
        magnitude = abs(1 - alpha) * w1[key].double().abs() + abs(alpha) * w2[key].double().abs()
        atol = (EPS[dtype] + 8 * EPS[torch.float32]) * magnitude + torch.finfo(dtype).tiny
        _close(got[key], exp[key], atol, f"interpolation {key}")


# --------------------------------------------------------------------------------------------
# sample_combine
# --------------------------------------------------------------------------------------------
@PROPERTY
@given(
    seed=seeds,
    batch=st.integers(0, 6),
    m=st.integers(1, 4),
    s=st.integers(1, 5),
    n=st.integers(1, 40),
    dtype=dtypes,
    weight_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    layout=st.sampled_from(["contiguous", "permuted", "sliced"]),
    weight_layout=st.sampled_from(["contiguous", "transposed"]),
)
def test_sample_combine_matches_reference(seed, batch, m, s, n, dtype, weight_dtype, layout, weight_layout):
    gen = torch.Generator().manual_seed(seed)
    stacked = _randn((batch, m, s, n), gen).to(dtype)
    if layout == "permuted":
        stacked = stacked.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    elif layout == "sliced":
        stacked = _with_layout(stacked, "sliced")
    weights = _randn((batch, s), gen).to(weight_dtype)
    if weight_layout == "transposed":
        weights = weights.t().contiguous().t()
    got = sample_combine(stacked, weights)
    assert got.dtype == dtype and got.shape == (batch, m, n)
    expected = sample_combine_reference(stacked.double(), weights.double())
    magnitude = torch.einsum("bmsn,bs->bmn", stacked.double().abs(), weights.double().abs())
    atol = (EPS[dtype] + 4 * s * EPS[torch.float32]) * magnitude + torch.finfo(dtype).tiny
    _close(got, expected, atol, "sample_combine")
