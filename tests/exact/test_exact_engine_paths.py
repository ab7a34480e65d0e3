"""The exact engine's whole-batch paths: norms folded over the batch, and engine calls from several threads.

Each case runs against per-sample merging (the reference of tests/exact/test_exact_zoo.py), with the sources differing
only in the named parameters, so that both the shared and the per-sample branch of every path are reached.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from dawin_ext import SampleWiseInterpolator

B = 5


def sources_varying(model: nn.Module, keys: set[str], seed: int = 0) -> list[dict]:
    """The model's state dict and a copy where only ``keys`` are perturbed (variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    other = {}
    for k, v in sd.items():
        if k not in keys:
            other[k] = v.clone()
        elif k.endswith("running_var"):
            other[k] = v * torch.exp(0.3 * torch.randn(v.shape, generator=g))
        else:
            other[k] = v + 0.3 * torch.randn(v.shape, generator=g)
    return [sd, other]


def check(model: nn.Module, x: torch.Tensor, keys: set[str]) -> None:
    model = model.eval()
    sources = sources_varying(model, keys)
    lam = torch.linspace(-0.2, 1.2, B)
    rows = torch.stack([1 - lam, lam], 1)
    sw = SampleWiseInterpolator(model, sources)
    assert set(sw.varying_keys) == keys
    with torch.no_grad():
        got = sw(x, rows)
        ref = copy.deepcopy(model)
        want = []
        for b in range(B):
            ref.load_state_dict({k: (rows[b, 0] * sources[0][k] + rows[b, 1] * sources[1][k]) if k in keys
                                 else sources[0][k] for k in sources[0]})  # fmt: skip
            want.append(ref(x[b : b + 1]))
        want = torch.cat(want)
        base = model(x)
    assert (got - want).abs().max().item() <= 1e-4
    assert (base - want).abs().max().item() > 1e-3, "the varying keys do not change the output"


def conv_bn(channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
    )
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(B, 3, 7, 9)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return m, x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "keys",
    [
        {"0.weight"},  # batch norm with shared statistics after a varying convolution: the folded stock kernel
        {"1.running_mean", "1.running_var"},  # per-sample statistics
        {"1.weight", "1.bias", "4.running_var"},  # per-sample affine in one layer, statistics in another
    ],
    ids=["shared-stats", "varying-stats", "varying-affine"],
)
def test_batch_norm_paths(channels_last, keys):
    m, x = conv_bn(channels_last)
    check(m, x, keys)


@pytest.mark.parametrize("keys", [{"0.weight"}, {"1.running_mean"}], ids=["shared-stats", "varying-stats"])
def test_batch_norm_1d(keys):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        m[1].running_mean.normal_()
    check(m, torch.randn(B, 6), keys)


class TokensThenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.norm2 = nn.LayerNorm([3, 8])

    def forward(self, x):
        return self.norm2(self.norm(self.proj(x)))


@pytest.mark.parametrize(
    "keys",
    [{"proj.weight"}, {"norm.weight"}, {"norm.bias"}, {"norm.weight", "norm.bias", "norm2.weight"}],
    ids=["shared-affine", "varying-weight", "varying-bias", "varying-both"],
)
def test_layer_norm_paths(keys):
    torch.manual_seed(2)
    check(TokensThenNorm(), torch.randn(B, 3, 5), keys)


def test_concurrent_engine_calls_equal_sequential_calls():
    m, x = conv_bn(False)
    m = m.eval()
    sw = SampleWiseInterpolator(m, sources_varying(m, {"0.weight", "1.running_var", "3.weight"}))
    rows = [torch.stack([1 - lam, lam], 1) for lam in torch.rand(8, B, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        want = [sw(x, r) for r in rows]
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(3):
                    got[i] = sw(x, rows[i])
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    fastpath = torch.backends.mha.get_fastpath_enabled()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, w in enumerate(want):
        assert torch.equal(got[i], w), f"thread {i} differs from its sequential call"
    assert torch.backends.mha.get_fastpath_enabled() == fastpath, "the engine left the MHA fast path switched"


class _TwoScales(nn.Module):
    """One convolution applied at two input sizes and, under no_grad, once more: the engine keeps one plan per
    layer and input shape, so each call must get its own route, padding and tap crop."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 7, padding=3, padding_mode="reflect")
        self.dw = nn.Conv2d(6, 6, 7, padding=3, groups=6)

    def forward(self, x):
        small = nn.functional.avg_pool2d(x, 4)
        a = self.dw(self.conv(x)).mean((2, 3))
        b = self.dw(self.conv(small)).mean((2, 3))
        return a + b


def test_conv_plans_are_per_input_shape():
    torch.manual_seed(0)
    model = _TwoScales().eval()
    keys = {"conv.weight", "conv.bias", "dw.weight", "dw.bias"}
    sources = sources_varying(model, keys)
    rows = torch.stack([torch.linspace(1.2, -0.2, B), torch.linspace(-0.2, 1.2, B)], 1)
    sw = SampleWiseInterpolator(model, sources)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for x in (torch.randn(B, 4, 16, 16), torch.randn(B, 4, 20, 16), torch.randn(3, 4, 16, 16)):
            got = sw(x, rows[: len(x)])  # one engine: the plans made by earlier calls are reused or extended
            for b in range(len(x)):
                ref.load_state_dict({k: rows[b, 0] * sources[0][k] + rows[b, 1] * sources[1][k] for k in sources[0]})
                assert (got[b] - ref(x[b : b + 1])[0]).abs().max().item() <= 1e-4


class _SmallParams(nn.Module):
    """Layer norms, a layer scale and a class token: the small parameters an engine call merges per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(8)
        self.norm2 = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.token = nn.Parameter(torch.randn(1, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.cat([self.token.expand(x.shape[0], 1, 8), x], 1)
        h = self.proj(self.norm1(h)) * self.scale
        return self.norm2(h).exp().mean(1)


def test_small_parameters_merged_in_groups_across_calls():
    """Later calls merge the small parameters of earlier calls with one addmm per group (same active sources):
    three sources where some parameters differ only in the last one make two groups; every call stays exact."""
    torch.manual_seed(0)
    model = _SmallParams().eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    s1 = {k: v + 0.3 * torch.randn(v.shape, generator=g) if k.startswith(("norm1", "scale")) else v.clone()
          for k, v in sd.items()}  # fmt: skip
    s2 = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    sources = [sd, s1, s2]
    sw = SampleWiseInterpolator(model, sources)
    ref = copy.deepcopy(model)
    for call in range(3):
        n = (5, 3, 5)[call]
        x = torch.randn(n, 4, 8)
        rows = torch.softmax(torch.randn(n, 3, generator=g), 1)
        with torch.no_grad():
            got = sw(x, rows)
            for b in range(n):
                ref.load_state_dict({k: sum(rows[b, s] * sources[s][k] for s in range(3)) for k in sd})
                assert (got[b] - ref(x[b : b + 1])[0]).abs().max().item() <= 1e-5, (call, b)
    groups = {id(gr): gr for gr in sw._engine.group_of.values()}
    assert len(groups) == 2 and sum(len(gr.slots) for gr in groups.values()) == 6  # proj.bias goes to the kernel


class _OneWeightTwoBiases(nn.Module):
    """One convolution weight and one linear weight used with two different biases each (one varying, one the same
    in every source): each call must add its own bias, whether fused into the kernel or added after it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(6, 4, 3, 3))
        self.b1 = nn.Parameter(torch.randn(6))
        self.b2 = nn.Parameter(torch.randn(6))
        self.lin = nn.Linear(6, 5)
        self.lin_b2 = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = nn.functional.conv2d(x, self.w, self.b1, padding=1) - nn.functional.conv2d(x, self.w, self.b2, padding=1)
        h = h.mean((2, 3))
        return self.lin(h) * nn.functional.linear(h, self.lin.weight, self.lin_b2)


def test_biases_fused_per_call_not_per_layer():
    torch.manual_seed(0)
    model = _OneWeightTwoBiases().eval()
    keys = {"w", "b1", "lin.weight", "lin.bias"}  # b2 and lin_b2 are the same in both sources
    sources = sources_varying(model, keys)
    rows = torch.stack([torch.linspace(1.2, -0.2, B), torch.linspace(-0.2, 1.2, B)], 1)
    sw = SampleWiseInterpolator(model, sources)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _ in range(2):  # the second call runs on the kept conv plans
            x = torch.randn(B, 4, 8, 8)
            got = sw(x, rows)
            for b in range(B):
                ref.load_state_dict({k: rows[b, 0] * sources[0][k] + rows[b, 1] * sources[1][k] for k in sources[0]})
                assert (got[b] - ref(x[b : b + 1])[0]).abs().max().item() <= 1e-4
