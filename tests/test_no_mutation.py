"""Nothing the caller passes in is modified, unless they passed ``out=``.

Every input tensor is fingerprinted (a clone of its values, data pointer, version counter, shape,
strides, dtype, device, requires_grad) before and after each public call; the fingerprints must match.
The version counter catches in-place writes even when they restore the same values.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import dawin_ext
from dawin_ext import (
    blend,
    entropy_coefficients,
    interpolation,
    sample_combine,
    samplewise_depthwise_conv2d,
    samplewise_linear,
    samplewise_linear_weights,
    softmax_entropy,
)
from dawin_ext import (
    exact as samplewise,
)
from dawin_ext.methods import adawise, dawin, mixture
from dawin_ext.methods.wise_ft import diagonal_fisher, output_ensemble, wise_ft
from dawin_ext.ops import samplewise_lora, samplewise_lora_factors


def _tensors(obj, path="arg"):
    """Yields (path, tensor) for every tensor reachable from obj (containers, modules, numpy arrays)."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, nn.Module):
        for name, t in obj.state_dict(keep_vars=True).items():
            yield f"{path}.{name}", t
            if t.grad is not None:
                yield f"{path}.{name}.grad", t.grad
    elif isinstance(obj, np.ndarray):
        yield path, torch.from_numpy(obj)  # shares memory: writes through numpy show up
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def fingerprint(*args, **kwargs) -> dict:
    prints = {}
    for path, t in _tensors((args, kwargs)):
        prints[path] = (
            t.detach().clone(),
            t.data_ptr(),
            t._version,
            tuple(t.shape),
            t.stride(),
            t.dtype,
            t.device,
            t.requires_grad,
        )
    return prints


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), "the set of tensors reachable from the arguments changed"
    for path, (v0, ptr0, ver0, *meta0) in before.items():
        v1, ptr1, ver1, *meta1 = after[path]
        assert meta0 == meta1, f"{path}: shape/stride/dtype/device/requires_grad changed: {meta0} -> {meta1}"
        assert ptr0 == ptr1, f"{path}: storage was replaced"
        assert ver0 == ver1, f"{path}: written in place (version {ver0} -> {ver1})"
        assert torch.equal(v0, v1) or (v0.is_floating_point() and torch.allclose(v0, v1, equal_nan=True)), (
            f"{path}: values changed"
        )


def call_and_check(fn, *args, **kwargs):
    before = fingerprint(*args, **kwargs)
    result = fn(*args, **kwargs)
    assert_unchanged(before, fingerprint(*args, **kwargs))
    return result


def _sd(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 5, generator=g).to(dtype),
        "b": torch.randn(6, generator=g).to(dtype),
        "w_t": torch.randn(5, 6, generator=g).to(dtype).t(),  # non-contiguous source
        "steps": torch.tensor(seed),
    }


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_softmax_entropy(dtype, requires_grad):
    x = torch.randn(4, 7, 9).to(dtype)[:, ::2].requires_grad_(requires_grad)
    call_and_check(softmax_entropy, x, 0.7)


def test_softmax_entropy_backward_leaves_logits_alone():
    x = torch.randn(5, 6, requires_grad=True)
    before = fingerprint(x.detach())
    softmax_entropy(x, 1.3).sum().backward()
    assert_unchanged(before, fingerprint(x.detach()))


@pytest.mark.parametrize("offset", [False, True])
def test_entropy_coefficients(offset):
    x = torch.randn(2, 6, 5)
    call_and_check(entropy_coefficients, x, [0.9, 1.1], offset)
    call_and_check(entropy_coefficients, [x[0], x[1].t().contiguous().t()], [0.9, 1.1], offset)


def test_blend_without_out():
    sources = [_sd(0), _sd(1), _sd(2)]
    coef = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    call_and_check(blend, sources, coef)


def test_blend_with_out_writes_only_out():
    sources = [_sd(0), _sd(1)]
    coef = np.array([[0.25, 0.75]])
    out = [{k: torch.empty(v.shape, dtype=v.dtype) for k, v in _sd(9).items()}]
    ptrs = {k: v.data_ptr() for k, v in out[0].items()}
    before = fingerprint(sources, coef)
    result = blend(sources, coef, out=out)
    assert_unchanged(before, fingerprint(sources, coef))
    assert result[0] is out[0]
    assert {k: v.data_ptr() for k, v in out[0].items()} == ptrs, "out tensors must be written in place"


def test_blend_accepts_modules_without_touching_them():
    torch.manual_seed(0)
    m0, m1 = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    call_and_check(blend, [m0, m1], [0.5, 0.5])


def test_interpolation():
    call_and_check(interpolation, torch.tensor(0.3), _sd(0), _sd(1))


def test_sample_combine():
    x = torch.randn(3, 2, 4, 10)[..., ::2]
    w = torch.rand(3, 4).requires_grad_(True)
    call_and_check(sample_combine, x, w)


def test_samplewise_linear():
    x = torch.randn(3, 7, 20)[..., ::2]  # strided input
    w = torch.randn(2, 12, 10)
    c = torch.rand(3, 2)
    b = torch.randn(2, 12)
    call_and_check(samplewise_linear, x, w, c, b)
    call_and_check(samplewise_linear, x, samplewise_linear_weights(list(w)), c.double())
    call_and_check(samplewise_linear_weights, [w[0], w[1]])


def test_samplewise_depthwise_conv2d():
    x = torch.randn(3, 6, 7, 8)[:, ::2]  # strided channels
    w = torch.randn(2, 3, 1, 3, 3)
    c = torch.rand(3, 2)
    b = torch.randn(2, 3)
    call_and_check(samplewise_depthwise_conv2d, x, w, c, b, 1, 1)
    call_and_check(samplewise_depthwise_conv2d, x.contiguous(memory_format=torch.channels_last), w, c.double())


def test_outputs_do_not_alias_inputs():
    sources = [_sd(0), _sd(1)]
    out = blend(sources, [1.0, 0.0])[0]
    for key, t in out.items():
        assert t.data_ptr() != sources[0][key].data_ptr(), f"{key}: result aliases source 0"
    x = torch.randn(2, 1, 1, 3)
    y = sample_combine(x, torch.ones(2, 1))
    assert y.data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------------------------
# high-level API (each test runs once its module exists)
# --------------------------------------------------------------------------------------------
def _tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def _loader(n=24, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_wise_ft_plain_and_fisher():
    sd0, sd1 = _tiny_model(0).state_dict(), _tiny_model(1).state_dict()
    call_and_check(wise_ft, sd0, sd1, 0.4)
    fishers = tuple({k: torch.rand_like(v) for k, v in sd.items() if v.is_floating_point()} for sd in (sd0, sd1))
    call_and_check(wise_ft, sd0, sd1, 0.4, fishers=fishers)


def test_output_ensemble():
    call_and_check(output_ensemble, torch.randn(5, 3), torch.randn(5, 3), torch.rand(5))


def test_diagonal_fisher_keeps_the_model():
    model, loader = _tiny_model(0), _loader()
    model.train()
    call_and_check(diagonal_fisher, model, loader, max_samples=6)
    assert model.training, "diagonal_fisher must restore the module's mode"
    assert all(p.grad is None for p in model.parameters())


def test_beta_mixture_fit_and_predict():
    lam = np.random.default_rng(0).beta(2, 5, size=60)
    lam[:3] = [0.0, 1.0, 0.5]
    bm = call_and_check(mixture.BetaMixture(n_components=3).fit, lam)
    call_and_check(bm.predict, torch.from_numpy(lam.copy()))


def test_dirichlet_mixture_fit():
    pi = torch.softmax(torch.randn(40, 3), dim=1)
    pi[0] = torch.tensor([1.0, 0.0, 0.0])
    call_and_check(mixture.DirichletMixture(n_components=2).fit, pi)


@pytest.mark.parametrize("expertise", ["entropy", "cross_entropy", "selective"])
def test_dawin_fit_and_predict(expertise):
    model, zs, ft = _tiny_model(0), _tiny_model(1), _tiny_model(2)
    loader = _loader()
    before_model = fingerprint(model)
    d = call_and_check(
        dawin.DaWin,
        model,
        zs.state_dict(),
        ft,
        expertise=expertise,
        n_clusters=2,
        offset_adjustment=expertise == "entropy",
    )
    call_and_check(d.fit, loader)
    call_and_check(d.predict, loader[0][0])
    call_and_check(d.predict_dataset, loader)
    assert_unchanged(before_model, fingerprint(model))


def test_dawin_coefficients():
    zs, ft = torch.randn(10, 4), torch.randn(10, 4)
    call_and_check(dawin.dawin_coefficients, zs, ft, temperatures=(0.9, 1.1), offset=True)


def test_adawise():
    model, zs, ft = _tiny_model(0), _tiny_model(1), _tiny_model(2)
    zs_sd = zs.state_dict()
    before_model = fingerprint(model)
    a = call_and_check(adawise.AdaWiSE, model, zs_sd, ft, n_evals=4, n_init=2)
    loader = _loader()
    call_and_check(a.predict, loader[0][0])
    call_and_check(a.predict_dataset, loader)
    assert_unchanged(before_model, fingerprint(model))


def test_samplewise_interpolator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 4))
    sources = [_tiny_model(1).state_dict(), _tiny_model(2).state_dict()]
    sources = [{k: v for k, v in sd.items() if not k.startswith("1.")} for sd in sources]  # drop BatchNorm
    sources = [{**sd, "1.weight": torch.rand(8), "1.bias": torch.rand(8)} for sd in sources]
    interp = call_and_check(samplewise.SampleWiseInterpolator, model, sources)
    lam = torch.rand(5)
    call_and_check(interp, torch.randn(5, 6), torch.stack([1 - lam, lam], 1))
    call_and_check(interp.forward_candidates, torch.randn(5, 6), torch.tensor([[1.0, 0.0], [0.5, 0.5]]))


def test_samplewise_lora():
    torch.manual_seed(0)
    x, w, bias, c = torch.randn(3, 7, 10), torch.randn(6, 10), torch.randn(6), torch.rand(3, 2)
    a_list, b_list = [torch.randn(2, 10), torch.randn(2, 10)], [torch.randn(6, 2), torch.randn(6, 2)]
    a, b = call_and_check(samplewise_lora_factors, a_list, b_list)
    call_and_check(samplewise_lora, x, a, b, c, w, bias)
    call_and_check(samplewise_lora, x, a, b, c, w.t().contiguous().t(), bias)  # the brgemm base path
    call_and_check(samplewise_lora, x, a, b, c, None, bias)  # bias only: the output must not alias it


def test_fingerprint_catches_in_place_writes():
    # The checker itself must be able to fail.
    x = torch.randn(3)
    before = fingerprint(x)
    x.add_(0)  # same values, new version
    with pytest.raises(AssertionError, match="written in place"):
        assert_unchanged(before, fingerprint(x))
    y = torch.randn(3)
    before = fingerprint(y)
    y.data[0] += 1  # .data bypasses the version counter; the value check catches it
    with pytest.raises(AssertionError, match="values changed"):
        assert_unchanged(before, fingerprint(y))


def _names_used(code) -> set[str]:
    """Every global or attribute name a function's code (and the lambdas and closures inside it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_used(const)
    return names


def test_public_ops_are_covered():
    # Derived from the tests above, not listed by hand: a new public op fails here until some test in this module
    # calls it.
    tests = [f for n, f in globals().items() if n.startswith("test_") and n != "test_public_ops_are_covered"]
    covered = set().union(*(_names_used(f.__code__) for f in tests))
    ops = {n for n in dawin_ext.ops.__all__ if callable(getattr(dawin_ext.ops, n)) and n[0].islower()}
    assert ops <= covered, f"add no-mutation tests for {sorted(ops - covered)}"
