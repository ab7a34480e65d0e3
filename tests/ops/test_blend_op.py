"""The multi-tensor blend kernel (``dawin_ext.blend`` / ``torch.ops.dawin_ext.blend_``) against a float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLEND_DTYPES
from torch import nn

import dawin_ext
from dawin_ext.testing.reference_ops import blend_reference, interpolation_reference

# Odd sizes: empty, single element, shorter than any vector, a vector tail, and one past a chunk.
SIZES = {"empty": (0,), "one": (1,), "three": (3,), "w1023": (31, 33), "big": ((1 << 16) + 1,)}
# Half an output ulp for the rounding to the output dtype (round to nearest even), with slack.
OUT_EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ACC_EPS = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 1e-6, torch.bfloat16: 1e-6}


def random_state_dicts(S: int, dtype: torch.dtype, device, gen: torch.Generator, sizes=SIZES) -> list[dict]:
    return [
        {
            k: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
            for k, shape in sizes.items()
        }
        for _ in range(S)
    ]


def expected(sources: list[dict], coef: torch.Tensor) -> list[dict]:
    """float64 reference: out[k] = sum_s coef[k, s] * sources[s] (inputs exactly as stored)."""
    coef = torch.as_tensor(coef, dtype=torch.float64)
    return [
        {key: sum(float(c) * sd[key].double().cpu() for c, sd in zip(row, sources, strict=True)) for key in sources[0]}
        for row in coef
    ]


def assert_blend_close(got: dict, want: dict, sources: list[dict], coef, dtype) -> None:
    """|got - want| within the output rounding plus the accumulation error bound, elementwise."""
    coef = torch.as_tensor(coef, dtype=torch.float64)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        for key in w:
            assert g[key].dtype == dtype and g[key].shape == sources[0][key].shape
            mag = sum(abs(float(c)) * sd[key].double().cpu().abs() for c, sd in zip(coef[k], sources, strict=True))
            err = (g[key].double().cpu() - w[key]).abs()
            bound = OUT_EPS[dtype] * w[key].abs() + ACC_EPS[dtype] * mag + 1e-30
            if dtype == torch.float16:
                bound = bound + 2.0**-25  # subnormal spacing
            bad = err > bound
            assert not bool(bad.any()), (
                f"cluster {k} key {key!r}: max error {err.max().item():.3g} over bound at {bad.nonzero()[0].tolist()}"
            )


@pytest.mark.parametrize("dtype", BLEND_DTYPES, ids=str)
@pytest.mark.parametrize("S", range(2, 10))
def test_blend_matches_float64_reference(device, dtype, S):
    gen = torch.Generator().manual_seed(100 + S)
    sources = random_state_dicts(S, dtype, device, gen)
    for K in range(1, 9):
        coef = torch.randn(K, S, generator=gen, dtype=torch.float64)
        got = dawin_ext.blend(sources, coef)
        assert len(got) == K and all(list(g) == list(sources[0]) for g in got)
        assert all(t.device.type == torch.device(device).type for g in got for t in g.values())
        assert_blend_close(got, expected(sources, coef), sources, coef, dtype)


@pytest.mark.parametrize("dtype", BLEND_DTYPES, ids=str)
def test_noncontiguous_and_misaligned_sources(device, dtype):
    gen = torch.Generator().manual_seed(7)
    base = [torch.randn(1, 70001, generator=gen).to(dtype=dtype, device=device) for _ in range(3)]
    mats = [torch.randn(257, 130, generator=gen).to(dtype=dtype, device=device) for _ in range(3)]
    sources = [{"offset": b[0, 1:], "transposed": m.t(), "strided": m[:, ::2]} for b, m in zip(base, mats, strict=True)]
    assert not sources[0]["transposed"].is_contiguous()
    assert sources[0]["offset"].data_ptr() % 16 != 0
    coef = torch.tensor([[0.25, 0.5, 0.25], [1.5, -0.75, 0.125]], dtype=torch.float64)
    got = dawin_ext.blend(sources, coef)
    assert all(t.is_contiguous() for g in got for t in g.values())
    assert_blend_close(got, expected(sources, coef), sources, coef, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_outputs_and_streaming_stores(device, dtype):
    # > 32 MiB of output takes the CPU's non-temporal store path; outputs offset by one element
    # (the same or different misalignment per cluster) take its scalar head / plain-store fallback.
    n = (1 << 22) + 13
    gen = torch.Generator().manual_seed(11)
    sources = [{"w": torch.randn(n, generator=gen).to(dtype=dtype, device=device)} for _ in range(2)]
    coef = torch.tensor([[0.3, 0.7], [-1.0, 2.0], [0.5, 0.5]], dtype=torch.float64)
    want = expected(sources, coef)
    for offsets in [(0, 0, 0), (1, 1, 1), (0, 1, 3)]:
        bufs = [torch.zeros(n + 4, dtype=dtype, device=device) for _ in offsets]
        out = [{"w": b[o : o + n]} for b, o in zip(bufs, offsets, strict=True)]
        ptrs = [o["w"].data_ptr() for o in out]
        dawin_ext.blend(sources, coef, out=out)
        assert [o["w"].data_ptr() for o in out] == ptrs
        assert_blend_close(out, want, sources, coef, dtype)
        for b, o in zip(bufs, offsets, strict=True):  # nothing written outside the views
            assert bool((b[:o] == 0).all()) and bool((b[o + n :] == 0).all())


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_cpu_code_path(capability):
    """ATEN_CPU_CAPABILITY selects the scalar, AVX2 or AVX512 copy of the CPU kernel (once per process)."""
    script = textwrap.dedent(
        """
        import torch, dawin_ext
        gen = torch.Generator().manual_seed(3)
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for S, K in ((2, 3), (3, 2), (5, 7)):
                srcs = [torch.randn(40000 + 37, generator=gen, dtype=torch.float64).to(dtype) for _ in range(S)]
                coef = torch.randn(K, S, generator=gen, dtype=torch.float64)
                out = dawin_ext.blend([{"w": s[1:]} for s in srcs], coef)
                want = coef @ torch.stack([s[1:].double() for s in srcs])
                tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
                for k in range(K):
                    torch.testing.assert_close(out[k]["w"].double(), want[k], atol=tol, rtol=tol)
        print("ok", torch.backends.cpu.get_cpu_capability())
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def test_out_writes_in_place_without_reallocating(device):
    gen = torch.Generator().manual_seed(5)
    sources = random_state_dicts(2, torch.float32, device, gen)
    coef = torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)
    out = [{k: torch.full_like(v, float("nan")) for k, v in sources[0].items()} for _ in range(2)]
    ptrs = [{k: v.data_ptr() for k, v in o.items()} for o in out]
    for _ in range(2):
        res = dawin_ext.blend(sources, coef, out=out)
        assert res is out or all(r is o for r, o in zip(res, out, strict=True))
        assert [{k: v.data_ptr() for k, v in o.items()} for o in out] == ptrs
        assert_blend_close(out, expected(sources, coef), sources, coef, torch.float32)


def test_out_into_a_live_models_parameters(device):
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Linear(9, 33), nn.BatchNorm1d(33), nn.Linear(33, 5)).to(device)

    m0, m1, live = make(), make(), make()
    for m in (m0, m1):
        m.train()(torch.randn(8, 9, device=device))  # updates running stats and num_batches_tracked
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    params = {n: p.data_ptr() for n, p in live.named_parameters()}
    dawin_ext.blend([sd0, sd1], [[0.3, 0.7]], out=[live.state_dict()])
    assert {n: p.data_ptr() for n, p in live.named_parameters()} == params
    for key, v in live.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.3 * sd0[key] + 0.7 * sd1[key], atol=1e-6, rtol=1e-6)
        else:  # num_batches_tracked: copied from source 0, not blended
            assert v.dtype == sd0[key].dtype and torch.equal(v, sd0[key])
    # The module still works and autograd still sees its parameters.
    live(torch.randn(4, 9, device=device)).sum().backward()
    assert all(p.grad is not None for p in live.parameters())


def test_non_floating_keys_are_copied_not_blended(device):
    gen = torch.Generator().manual_seed(9)
    sources = []
    for s in range(3):
        sd = {"w": torch.randn(5, generator=gen).to(device)}
        sd["steps"] = torch.tensor(10 * (s + 1), device=device)
        sd["mask"] = torch.tensor([True, s == 0, False], device=device)
        sd["idx"] = torch.arange(4, device=device, dtype=torch.int32) + s
        sources.append(sd)
    coef = [[0.2, 0.3, 0.5], [1.0, 1.0, 1.0]]
    for out in (None, [{k: torch.empty_like(v) for k, v in sources[0].items()} for _ in coef]):
        got = dawin_ext.blend(sources, coef, out=out)
        for g in got:
            for key in ("steps", "mask", "idx"):
                assert g[key].dtype == sources[0][key].dtype
                assert torch.equal(g[key], sources[0][key])
                assert g[key].data_ptr() != sources[0][key].data_ptr()  # a copy, not an alias


def test_inputs_are_not_mutated(device):
    gen = torch.Generator().manual_seed(13)
    sources = random_state_dicts(3, torch.bfloat16, device, gen)
    sources[0]["transposed"] = torch.randn(6, 7, generator=gen).to(device).t()
    for sd in sources[1:]:
        sd["transposed"] = torch.randn(6, 7, generator=gen).to(device).t()
    before = [{k: v.clone() for k, v in sd.items()} for sd in sources]
    coef = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    coef_before = coef.clone()
    dawin_ext.blend(sources, coef)
    for sd, sb in zip(sources, before, strict=True):
        for k in sd:
            assert torch.equal(sd[k], sb[k])
    assert torch.equal(coef, coef_before)


@pytest.mark.parametrize("S,K", [(2, 1), (3, 2), (5, 6)])
def test_in_place_into_source_zero(device, S, K):
    """out may be one of the sources (exact aliasing): every element is read before it is written."""
    gen = torch.Generator().manual_seed(17)
    sources = random_state_dicts(S, torch.float32, device, gen)
    coef = torch.randn(K, S, generator=gen, dtype=torch.float64)
    want = expected(sources, coef)
    out = [sources[0]] + [{k: torch.empty_like(v) for k, v in sources[0].items()} for _ in range(K - 1)]
    dawin_ext.blend(sources, coef, out=out)
    for k in range(K):
        for key in want[k]:
            torch.testing.assert_close(out[k][key].double().cpu(), want[k][key], atol=1e-5, rtol=1e-5)


def test_nan_is_propagated_not_hidden(device):
    a = {"w": torch.tensor([1.0, float("nan"), 3.0], device=device)}
    b = {"w": torch.tensor([1.0, 2.0, float("inf")], device=device)}
    out = dawin_ext.blend([a, b], [[1.0, 0.0], [0.5, 0.5]])
    assert torch.isnan(out[0]["w"][1]) and torch.isnan(out[1]["w"][1])
    assert torch.isnan(out[0]["w"][2])  # 0 * inf is NaN, as in the reference arithmetic
    assert torch.isinf(out[1]["w"][2])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 1.7, torch.tensor(0.45)])
def test_interpolation_equals_reference_comprehension(device, alpha):
    gen = torch.Generator().manual_seed(21)
    w1, w2 = random_state_dicts(2, torch.float32, device, gen)
    got = dawin_ext.interpolation(alpha, w1, w2)
    want = interpolation_reference(alpha, w1, w2)
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].device == want[key].device
        # fp32 with one rounding (FMA) vs the reference's three: equal to a few ulps.
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)


def test_more_than_sixteen_clusters_are_split(device):
    gen = torch.Generator().manual_seed(23)
    sources = random_state_dicts(3, torch.float16, device, gen)
    coef = torch.randn(37, 3, generator=gen, dtype=torch.float64)
    got = dawin_ext.blend(sources, coef)
    assert len(got) == 37
    assert_blend_close(got, expected(sources, coef), sources, coef, torch.float16)
    ref = blend_reference([{k: v.double() for k, v in sd.items()} for sd in sources], coef)
    for g, r in zip(got, ref, strict=True):
        for key in r:
            torch.testing.assert_close(g[key].double(), r[key].to(g[key].dtype).double(), atol=2e-3, rtol=2e-3)


def test_float64_accumulates_in_double(device):
    a = {"w": torch.full((1000,), 1.0 + 2.0**-40, dtype=torch.float64, device=device)}
    b = {"w": torch.full((1000,), 1.0, dtype=torch.float64, device=device)}
    got = dawin_ext.blend([a, b], [[1.0, -1.0]])[0]["w"]
    assert bool((got == 2.0**-40).all())  # float32 accumulation would give 0


def test_op_level_errors_name_the_problem(device):
    op = torch.ops.dawin_ext.blend_
    x = [torch.randn(4, device=device), torch.randn(4, device=device)]
    out = [torch.empty(4, device=device)]
    with pytest.raises(ValueError, match="clusters"):
        op(x, torch.zeros(0, 2), [])
    with pytest.raises(ValueError, match="output tensors"):
        op(x, torch.ones(2, 2), out)
    with pytest.raises(ValueError, match="tensor 0 of source 1 has shape"):
        op([x[0], torch.randn(5, device=device)], torch.ones(1, 2), out)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        op([x[0].int(), x[1].int()], torch.ones(1, 2), [out[0].int()])
    with pytest.raises(ValueError, match="must be contiguous"):
        op(
            [torch.randn(4, 2, device=device), torch.randn(4, 2, device=device)],
            torch.ones(1, 2),
            [torch.empty(2, 4, device=device).t()],
        )
    with pytest.raises(TypeError, match="complex"):
        dawin_ext.blend([{"z": torch.zeros(2, dtype=torch.complex64)}] * 2, [[0.5, 0.5]])


def test_opcheck(device):
    gen = torch.Generator().manual_seed(29)
    sources = [torch.randn(37, generator=gen).to(device) for _ in range(4)] + [
        torch.randn(3, 5, generator=gen).to(device).half() for _ in range(2)
    ]
    # Source-major flat list of S = 2 sources with N = 3 tensors each (fp32, fp32, fp16), and K = 2
    # cluster-major outputs.
    flat = [sources[0], sources[1], sources[4], sources[2], sources[3], sources[5]]
    out = [torch.empty_like(t) for _ in range(2) for t in flat[:3]]
    coef = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    torch.library.opcheck(torch.ops.dawin_ext.blend_.default, (flat, coef, out))


# --------------------------------------------------------------------------------------------
# Aliasing: outputs that share memory with sources or with each other (docs/errors.md)
# --------------------------------------------------------------------------------------------
def _snapshot(sources: list[dict]) -> list[dict]:
    return [{k: v.detach().clone() for k, v in sd.items()} for sd in sources]


def _assert_blends(out: list[dict], before: list[dict], coef, atol=1e-5) -> None:
    """Each out[k] equals the blend of the sources as they were before the call."""
    want = expected(before, coef)
    for k, (o, w) in enumerate(zip(out, want, strict=True)):
        for key in w:
            err = (o[key].double().cpu() - w[key]).abs().max().item() if w[key].numel() else 0.0
            assert err <= atol, f"cluster {k} key {key!r}: max error {err:.3g}"


def test_in_place_over_sixteen_clusters_issue_11_repro(device):
    """The issue-11 repro: out[0] is source 0 and K = 18 > 16 clusters take two launches."""
    gen = torch.Generator().manual_seed(31)
    a = {"w": torch.randn(1000, generator=gen).to(device)}
    b = {"w": torch.randn(1000, generator=gen).to(device)}
    al = torch.linspace(0.5, 1, 18, dtype=torch.float64)
    coef = torch.stack([1 - al, al], 1)
    before = _snapshot([a, b])
    out = [a] + [{"w": torch.empty(1000, device=device)} for _ in range(17)]
    dawin_ext.blend([a, b], coef, out=out)
    _assert_blends(out, before, coef)


@pytest.mark.parametrize("K", [17, 33, 40])
@pytest.mark.parametrize("where", ["first", "middle", "last", "two_sources"])
def test_in_place_clusters_anywhere_across_launches(device, K, where):
    gen = torch.Generator().manual_seed(37 + K)
    sources = random_state_dicts(3, torch.float32, device, gen)
    coef = torch.randn(K, 3, generator=gen, dtype=torch.float64)
    before = _snapshot(sources)
    out = [{k: torch.empty_like(v) for k, v in sources[0].items()} for _ in range(K)]
    at = {"first": {0: 0}, "middle": {K // 2: 1}, "last": {K - 1: 2}, "two_sources": {1: 0, K - 2: 2}}[where]
    for k, s in at.items():
        out[k] = sources[s]
    dawin_ext.blend(sources, coef, out=out)
    _assert_blends(out, before, coef)


def test_more_than_sixteen_in_place_clusters_snapshot_the_sources(device):
    """17 clusters each write into a different key of source 0: too many for one last launch."""
    gen = torch.Generator().manual_seed(41)
    keys = [f"k{i}" for i in range(17)]
    sources = [{k: torch.randn(300, generator=gen).to(device) for k in keys} for _ in range(2)]
    coef = torch.randn(17, 2, generator=gen, dtype=torch.float64)
    before = _snapshot(sources)
    out = []
    for j in range(17):
        od = {k: torch.empty(300, device=device) for k in keys}
        od[keys[j]] = sources[0][keys[j]]  # cluster j writes into source 0's key j
        out.append(od)
    dawin_ext.blend(sources, coef, out=out)
    _assert_blends(out, before, coef)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied, as in language models


def _tied_state_dicts(device, n: int) -> list[dict]:
    torch.manual_seed(43)
    sds = [_Tied().to(device).state_dict() for _ in range(n)]
    assert all(sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr() for sd in sds)
    return sds


@pytest.mark.parametrize("K", [1, 3, 18])
def test_tied_weights_in_place_get_one_value(device, K):
    """out[0] is source 0 whose two keys share a tensor; naively the second key reads blended values."""
    sources = _tied_state_dicts(device, 2)
    gen = torch.Generator().manual_seed(47)
    coef = torch.randn(K, 2, generator=gen, dtype=torch.float64)
    before = _snapshot(sources)
    out = [sources[0]] + [{k: torch.empty_like(v) for k, v in sources[0].items()} for _ in range(K - 1)]
    dawin_ext.blend(sources, coef, out=out)
    assert out[0]["head.weight"].data_ptr() == out[0]["embed.weight"].data_ptr()  # still tied
    _assert_blends(out, before, coef)


def test_tied_output_with_untied_but_equal_sources(device):
    """A live tied model as out, sources whose tied keys are separate copies with equal values."""
    sources = [{k: v.clone() for k, v in sd.items()} for sd in _tied_state_dicts(device, 3)]
    live = _Tied().to(device)
    coef = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    dawin_ext.blend(sources, coef, out=[live.state_dict()])
    assert live.head.weight is live.embed.weight
    _assert_blends([live.state_dict()], sources, coef)


def test_tied_output_with_sources_that_disagree_is_refused(device):
    sources = [{k: v.clone() for k, v in sd.items()} for sd in _tied_state_dicts(device, 2)]
    sources[1]["head.weight"] += 1.0  # source 1 no longer agrees under the two tied keys
    live = _Tied().to(device)
    weight_before = live.embed.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'embed\.weight' and 'head\.weight'.*tied.*source 1"):
        dawin_ext.blend(sources, [[0.5, 0.5]], out=[live.state_dict()])
    assert torch.equal(live.embed.weight, weight_before)  # refused before anything was written


def _fresh_like(sd: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def test_partial_overlap_with_a_source_is_refused(device):
    gen = torch.Generator().manual_seed(53)
    buf = torch.randn(1500, generator=gen).to(device)
    a, b = {"w": buf[500:1500]}, {"w": torch.randn(1000, generator=gen).to(device)}
    out = [{"w": buf[0:1000]}]  # overlaps the first half of a["w"]
    before = buf.clone()
    with pytest.raises(ValueError, match=r"out 0 key 'w' overlaps source 0 key 'w'"):
        dawin_ext.blend([a, b], [[0.5, 0.5]], out=out)
    assert torch.equal(buf, before)


def test_output_that_is_another_keys_source_is_refused(device):
    gen = torch.Generator().manual_seed(59)
    a = {"x": torch.randn(8, generator=gen).to(device), "y": torch.randn(8, generator=gen).to(device)}
    b = {"x": torch.randn(8, generator=gen).to(device), "y": torch.randn(8, generator=gen).to(device)}
    out = [{"x": a["y"], "y": torch.empty(8, device=device)}]
    with pytest.raises(ValueError, match=r"out 0 key 'x' is the same tensor as source 0 key 'y'"):
        dawin_ext.blend([a, b], [[0.5, 0.5]], out=out)


def test_transposed_view_of_an_output_as_source_is_refused(device):
    gen = torch.Generator().manual_seed(61)
    w = torch.randn(6, 6, generator=gen).to(device)
    with pytest.raises(ValueError, match=r"out 0 key 'w' overlaps source 1 key 'w'"):
        dawin_ext.blend([{"w": torch.randn(6, 6, device=device)}, {"w": w.t()}], [[0.5, 0.5]], out=[{"w": w}])


def test_one_tensor_in_two_clusters_outputs_is_refused(device):
    gen = torch.Generator().manual_seed(67)
    sources = random_state_dicts(2, torch.float32, device, gen)
    shared = _fresh_like(sources[0])
    with pytest.raises(ValueError, match=r"out 0 key '\w+' and out 1 key '\w+' are the same tensor"):
        dawin_ext.blend(sources, [[0.2, 0.8], [0.6, 0.4]], out=[shared, shared])


def test_partially_overlapping_output_keys_are_refused(device):
    gen = torch.Generator().manual_seed(71)
    sources = [
        {"a": torch.randn(100, generator=gen).to(device), "b": torch.randn(100, generator=gen).to(device)}
        for _ in range(2)
    ]
    buf = torch.zeros(150, device=device)
    with pytest.raises(ValueError, match=r"out 0 keys 'a' and 'b' overlap in memory"):
        dawin_ext.blend(sources, [[0.5, 0.5]], out=[{"a": buf[:100], "b": buf[50:]}])
    assert bool((buf == 0).all())


def test_disjoint_views_of_one_buffer_are_fine(device):
    """Outputs and sources carved from one flat buffer without overlapping: no false alarm."""
    gen = torch.Generator().manual_seed(73)
    flat = torch.randn(6 * 64, generator=gen).to(device)
    part = flat.view(6, 64)
    sources = [{"a": part[0], "b": part[1].view(8, 8)}, {"a": part[2], "b": part[3].view(8, 8)}]
    out = [{"a": part[4], "b": part[5].view(8, 8)}]
    before = _snapshot(sources)
    coef = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    dawin_ext.blend(sources, coef, out=out)
    _assert_blends(out, before, coef)


def test_op_level_aliasing(device):
    """Direct callers of torch.ops.dawin_ext.blend_ get the same protection, with tensor indices."""
    op = torch.ops.dawin_ext.blend_
    gen = torch.Generator().manual_seed(79)
    x = [torch.randn(1000, generator=gen).to(device) for _ in range(2)]
    x0 = x[0].clone()
    coef = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    other = torch.empty(1000, device=device)
    op(x, coef, [x[0], other])  # in place into source 0: allowed
    torch.testing.assert_close(x[0], 0.3 * x0 + 0.7 * x[1])
    torch.testing.assert_close(other, 0.9 * x0 + 0.1 * x[1])
    buf = torch.randn(1500, generator=gen).to(device)
    with pytest.raises(ValueError, match="output tensor 0 of cluster 0 overlaps tensor 0 of source 0"):
        op([buf[500:], x[1]], coef[:1], [buf[:1000]])
    with pytest.raises(ValueError, match="output tensor 0 of cluster 0 and output tensor 0 of cluster 1"):
        op(x, coef, [other, other])
    y = [torch.randn(1000, generator=gen).to(device) for _ in range(2)]
    with pytest.raises(ValueError, match="output tensor 0 of cluster 0 is the same memory as tensor 1 of source 0"):
        op([x[0], y[0], x[1], y[1]], coef[:1], [y[0], other])
