"""Bad input across the public API: every case asserts the exception type and what the message names.

Policy (docs/errors.md): an unsupported dtype or a wrong kind of object raises TypeError; every other
bad argument (shape, count, value, device, incompatible state dicts) raises ValueError. The message
starts with the function's name and names the offending key, sample, shape, dtype or device.
"""

from __future__ import annotations

import importlib
import math
import pickle
import re

import numpy as np
import pytest
import torch

from dawin_ext import blend, entropy_coefficients, interpolation, sample_combine, softmax_entropy
from dawin_ext.ops.statedict import IncompatibleStateDictsError, as_state_dict, check_compatible
from dawin_ext.testing.reference_ops import entropy_reference

INF = float("inf")
NAN = float("nan")


def _sd(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "linear.weight": torch.randn(4, 3, generator=g),
        "linear.bias": torch.randn(4, generator=g),
        "norm.weight": torch.randn(4, generator=g),
    }
    sd = {k: v.to(dtype=dtype, device=device) for k, v in sd.items()}
    sd["norm.num_batches_tracked"] = torch.tensor(7, device=device)
    return sd


def _with(key, value, seed=1):
    sd = _sd(seed=seed)
    sd[key] = value
    return sd


def _without(key, seed=1):
    sd = _sd(seed=seed)
    del sd[key]
    return sd


def _logits(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (id, thunk, exception type, regex fragment of the message)
CASES = [
    # ---- softmax_entropy
    ("entropy-temperature-zero", lambda: softmax_entropy(_logits(3, 5), 0.0), ValueError, r"temperature .*> 0, got 0"),
    ("entropy-temperature-negative", lambda: softmax_entropy(_logits(3, 5), -1.5), ValueError, r"got -1\.5"),
    ("entropy-temperature-nan", lambda: softmax_entropy(_logits(3, 5), NAN), ValueError, r"finite .*got nan"),
    ("entropy-temperature-inf", lambda: softmax_entropy(_logits(3, 5), INF), ValueError, r"finite .*got inf"),
    ("entropy-float64", lambda: softmax_entropy(_logits(3, 5, dtype=torch.float64)), TypeError, r"float32.*Double"),
    ("entropy-int64", lambda: softmax_entropy(torch.ones(3, 5, dtype=torch.long)), TypeError, r"got Long"),
    ("entropy-bool", lambda: softmax_entropy(torch.ones(3, 5, dtype=torch.bool)), TypeError, r"got Bool"),
    (
        "entropy-complex",
        lambda: softmax_entropy(torch.ones(3, 5, dtype=torch.complex64)),
        TypeError,
        r"got ComplexFloat",
    ),
    ("entropy-0d", lambda: softmax_entropy(torch.tensor(1.0)), ValueError, r"at least one dimension"),
    ("entropy-no-classes", lambda: softmax_entropy(torch.empty(3, 0)), ValueError, r"class dimension.*\[3, 0\]"),
    # ---- entropy_coefficients
    ("coef-2d-logits", lambda: entropy_coefficients(_logits(3, 5)), ValueError, r"\[M models, B samples, C"),
    ("coef-4d-logits", lambda: entropy_coefficients(_logits(2, 3, 5, 1)), ValueError, r"got shape \[2, 3, 5, 1\]"),
    (
        "coef-temperature-count",
        lambda: entropy_coefficients(_logits(2, 3, 5), [1.0]),
        ValueError,
        r"1 temperatures for 2 models",
    ),
    (
        "coef-temperature-zero",
        lambda: entropy_coefficients(_logits(2, 3, 5), [1.0, 0.0]),
        ValueError,
        r"temperature of model 1 .*got 0",
    ),
    (
        "coef-temperature-negative",
        lambda: entropy_coefficients(_logits(2, 3, 5), [-0.5, 1.0]),
        ValueError,
        r"model 0 .*got -0\.5",
    ),
    (
        "coef-temperature-nan",
        lambda: entropy_coefficients(_logits(2, 3, 5), [1.0, NAN]),
        ValueError,
        r"model 1 .*got nan",
    ),
    (
        "coef-offset-three-models",
        lambda: entropy_coefficients(_logits(3, 4, 5), offset_adjustment=True),
        ValueError,
        r"exactly 2 models.*M = 3",
    ),
    (
        "coef-offset-one-sample",
        lambda: entropy_coefficients(_logits(2, 1, 5), offset_adjustment=True),
        ValueError,
        r"at least 2 samples, got B = 1",
    ),
    ("coef-empty-list", lambda: entropy_coefficients([]), ValueError, r"empty list of logits"),
    (
        "coef-different-class-counts",
        lambda: entropy_coefficients([_logits(3, 5), _logits(3, 6)]),
        ValueError,
        r"different shapes \[\(3, 5\), \(3, 6\)\]",
    ),
    (
        "coef-different-devices",
        lambda: entropy_coefficients([_logits(3, 5), torch.empty(3, 5, device="meta")]),
        ValueError,
        r"different devices \['cpu', 'meta'\]",
    ),
    ("coef-no-models", lambda: entropy_coefficients(torch.empty(0, 3, 5)), ValueError, r"at least one model"),
    ("coef-no-classes", lambda: entropy_coefficients(torch.empty(2, 3, 0)), ValueError, r"class dimension"),
    ("coef-float64", lambda: entropy_coefficients(_logits(2, 3, 5, dtype=torch.float64)), TypeError, r"Double"),
    # ---- blend: coefficients
    ("blend-coef-wrong-S", lambda: blend([_sd(), _sd(seed=1)], [0.5]), ValueError, r"S = 2 sources, got \(1, 1\)"),
    (
        "blend-coef-3d",
        lambda: blend([_sd(), _sd(seed=1)], torch.zeros(2, 2, 2)),
        ValueError,
        r"\[K, S\].*\(2, 2, 2\)",
    ),
    ("blend-coef-no-rows", lambda: blend([_sd(), _sd(seed=1)], torch.zeros(0, 2)), ValueError, r"at least one row"),
    (
        "blend-coef-nan",
        lambda: blend([_sd(), _sd(seed=1)], [[0.5, 0.5], [0.5, NAN]]),
        ValueError,
        r"finite; entry \(1, 1\) is nan",
    ),
    ("blend-coef-inf", lambda: blend([_sd(), _sd(seed=1)], [[INF, 0.5]]), ValueError, r"entry \(0, 0\) is inf"),
    ("blend-coef-neg-inf", lambda: blend([_sd(), _sd(seed=1)], [[0.5, -INF]]), ValueError, r"\(0, 1\) is -inf"),
    ("blend-coef-strings", lambda: blend([_sd(), _sd(seed=1)], [["a", "b"]]), TypeError, r"numeric \[K, S\]"),
    ("blend-coef-none", lambda: blend([_sd(), _sd(seed=1)], None), TypeError, r"coefficients must be"),
    # ---- blend: sources
    ("blend-no-sources", lambda: blend([], [[1.0]]), ValueError, r"at least one source"),
    ("blend-too-many-sources", lambda: blend([_sd()] * 17, [1.0 / 17] * 17), ValueError, r"at most 16.*got 17"),
    ("blend-single-dict", lambda: blend(_sd(), [1.0]), TypeError, r"sequence of state dicts"),
    ("blend-not-a-state-dict", lambda: blend([_sd(), 3], [0.5, 0.5]), TypeError, r"source 1.*got int"),
    (
        "blend-missing-key",
        lambda: blend([_sd(), _without("linear.bias")], [0.5, 0.5]),
        IncompatibleStateDictsError,
        r"source 1 is missing key 'linear\.bias'",
    ),
    (
        "blend-extra-key",
        lambda: blend([_sd(), _with("head.weight", torch.zeros(2))], [0.5, 0.5]),
        IncompatibleStateDictsError,
        r"source 1 has extra key 'head\.weight'",
    ),
    (
        "blend-shape-mismatch",
        lambda: blend([_sd(), _with("linear.weight", torch.zeros(3, 4))], [0.5, 0.5]),
        IncompatibleStateDictsError,
        r"'linear\.weight'.*\(4, 3\).*\(3, 4\)",
    ),
    (
        "blend-dtype-mismatch",
        lambda: blend([_sd(), _with("norm.weight", torch.zeros(4, dtype=torch.float16))], [0.5, 0.5]),
        IncompatibleStateDictsError,
        r"'norm\.weight'.*torch\.float32.*torch\.float16",
    ),
    (
        "blend-device-mismatch",
        lambda: blend([_sd(), _with("linear.bias", torch.zeros(4, device="meta"))], [0.5, 0.5]),
        IncompatibleStateDictsError,
        r"'linear\.bias'.*cpu.*meta",
    ),
    (
        "blend-mixed-devices-in-one-dict",
        lambda: blend([_with("x", torch.zeros(1, device="meta"), seed=0)] * 2, [0.5, 0.5]),
        IncompatibleStateDictsError,
        r"several devices",
    ),
    (
        "blend-non-tensor-value",
        lambda: blend([_sd(), _with("linear.bias", [1, 2, 3, 4])], [0.5, 0.5]),
        TypeError,
        r"entry 'linear\.bias' is a list",
    ),
    (
        "blend-complex",
        lambda: blend([{"w": torch.zeros(2, dtype=torch.complex64)}] * 2, [0.5, 0.5]),
        TypeError,
        r"key 'w' has dtype torch\.complex64",
    ),
    # ---- blend: out=
    (
        "blend-out-count",
        lambda: blend([_sd(), _sd(seed=1)], [[0.5, 0.5]], out=[_sd(), _sd()]),
        ValueError,
        r"out has 2 state dicts.*K = 1",
    ),
    (
        "blend-out-shape",
        lambda: blend([_sd(), _sd(seed=1)], [[0.5, 0.5]], out=[_with("linear.weight", torch.zeros(12))]),
        IncompatibleStateDictsError,
        r"'linear\.weight'.*out 0 has \(12,\)",
    ),
    (
        "blend-out-dtype",
        lambda: blend(
            [_sd(), _sd(seed=1)], [[0.5, 0.5]], out=[_with("linear.bias", torch.zeros(4, dtype=torch.bfloat16))]
        ),
        IncompatibleStateDictsError,
        r"'linear\.bias'.*out 0 has torch\.bfloat16",
    ),
    (
        "blend-out-non-contiguous",
        lambda: blend([_sd(), _sd(seed=1)], [[0.5, 0.5]], out=[_with("linear.weight", torch.zeros(3, 4).t())]),
        ValueError,
        r"out 0 tensor 'linear\.weight' is not contiguous",
    ),
    (
        "blend-out-missing-key",
        lambda: blend([_sd(), _sd(seed=1)], [[0.5, 0.5]], out=[_without("norm.weight")]),
        IncompatibleStateDictsError,
        r"out 0 is missing key 'norm\.weight'",
    ),
    # ---- interpolation
    ("interp-alpha-nan", lambda: interpolation(NAN, _sd(), _sd(seed=1)), ValueError, r"alpha must be a finite"),
    ("interp-alpha-inf", lambda: interpolation(INF, _sd(), _sd(seed=1)), ValueError, r"alpha .*got inf"),
    (
        "interp-alpha-vector",
        lambda: interpolation(torch.tensor([0.1, 0.2]), _sd(), _sd(seed=1)),
        ValueError,
        r"alpha must be a scalar.*\(2,\)",
    ),
    (
        "interp-key-mismatch",
        lambda: interpolation(0.5, _sd(), _without("linear.weight")),
        IncompatibleStateDictsError,
        r"missing key 'linear\.weight'",
    ),
    # ---- sample_combine
    ("combine-3d", lambda: sample_combine(_logits(2, 3, 4), _logits(2, 4)), ValueError, r"\[B, M, S, N\]"),
    ("combine-weights-1d", lambda: sample_combine(_logits(2, 3, 4, 5), _logits(2)), ValueError, r"\[B, S\]"),
    (
        "combine-weights-shape",
        lambda: sample_combine(_logits(2, 3, 4, 5), _logits(2, 3)),
        ValueError,
        r"weights shape \[2, 3\] does not match \[B, S\] = \[2, 4\]",
    ),
    (
        "combine-weights-batch",
        lambda: sample_combine(_logits(2, 3, 4, 5), _logits(3, 4)),
        ValueError,
        r"\[3, 4\] does not match",
    ),
    (
        "combine-weights-int",
        lambda: sample_combine(_logits(2, 3, 4, 5), torch.ones(2, 4, dtype=torch.int32)),
        TypeError,
        r"weights must be floating point, got Int",
    ),
    (
        "combine-stacked-float64",
        lambda: sample_combine(_logits(2, 3, 4, 5, dtype=torch.float64), _logits(2, 4)),
        TypeError,
        r"stacked must be float32.*Double",
    ),
    (
        "combine-mixed-devices",
        lambda: sample_combine(_logits(2, 3, 4, 5), torch.empty(2, 4, device="meta")),
        ValueError,
        r"weights are on meta but stacked is on cpu",
    ),
    # ---- statedict helpers
    ("as-state-dict-list", lambda: as_state_dict([1, 2], "teacher"), TypeError, r"teacher: expected an nn\.Module"),
    (
        "as-state-dict-value",
        lambda: as_state_dict({"w": 1.0}, "teacher"),
        TypeError,
        r"teacher: entry 'w' is a float",
    ),
    (
        "check-compatible-names",
        lambda: check_compatible([_sd(), _with("linear.bias", torch.zeros(5))], names=["zero-shot", "fine-tuned"]),
        IncompatibleStateDictsError,
        r"'linear\.bias': zero-shot has shape \(4,\) but fine-tuned has \(5,\)",
    ),
]


@pytest.mark.parametrize(("thunk", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_blend_never_silently_skips_a_floating_dtype(dtype):
    # Every floating dtype blend accepts is really blended (never source 0 copied through): float64 in float64,
    # fp16/bf16 accumulated in float32 and rounded once. Integer buffers are copied from source 0.
    a, b = _sd(dtype), _sd(dtype, seed=1)
    out = blend([a, b], [[0.25, 0.75]])[0]
    for key in ("linear.weight", "linear.bias", "norm.weight"):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        expected = (0.25 * a[key].to(acc) + 0.75 * b[key].to(acc)).to(dtype)
        assert out[key].dtype == dtype, key
        if dtype == torch.float64:  # summed in float32, it would be off by ~1e-8
            torch.testing.assert_close(out[key], expected, rtol=1e-15, atol=1e-15)
        else:
            torch.testing.assert_close(out[key], expected)
        assert not torch.equal(out[key], a[key]), key
    assert torch.equal(out["norm.num_batches_tracked"], a["norm.num_batches_tracked"])


# --------------------------------------------------------------------------------------------
# Mixed CPU / CUDA (and two GPUs) where a GPU exists
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["entropy_coefficients", "blend", "sample_combine", "blend-out"])
def test_mixed_cpu_cuda(op, cuda_device):
    cpu, gpu = "cpu", cuda_device
    with pytest.raises(ValueError, match=r"cpu|cuda"):
        if op == "entropy_coefficients":
            entropy_coefficients([_logits(3, 5), _logits(3, 5).to(gpu)])
        elif op == "blend":
            blend([_sd(device=cpu), _sd(device=gpu)], [0.5, 0.5])
        elif op == "blend-out":
            blend([_sd(device=gpu), _sd(device=gpu)], [0.5, 0.5], out=[_sd(device=cpu)])
        else:
            sample_combine(_logits(2, 3, 4, 5).to(gpu), _logits(2, 4))


@pytest.mark.parametrize("method", ["wise_ft", "DaWin", "AdaWiSE", "DaWinMultiTask"])
@pytest.mark.parametrize(
    "other",
    ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_state_dicts_on_two_devices(method, other):
    # The methods refuse weights split across devices before any work, naming the key and both devices.
    import dawin_ext

    model, sd_cpu = _tiny(0), _tiny_sd(1)
    sd_other = {k: v.to(other) for k, v in _tiny_sd(2).items()}
    with pytest.raises(ValueError, match=rf"'0\.weight'.*cpu.*{other}"):
        if method == "wise_ft":
            dawin_ext.wise_ft(sd_cpu, sd_other, 0.5)
        elif method == "DaWinMultiTask":
            dawin_ext.DaWinMultiTask(model, sd_cpu, task_vectors=[sd_other])
        else:
            getattr(dawin_ext, method)(model, sd_cpu, sd_other)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus():
    with pytest.raises(ValueError, match=r"cuda:0.*cuda:1"):
        blend([_sd(device="cuda:0"), _sd(device="cuda:1")], [0.5, 0.5])


# --------------------------------------------------------------------------------------------
# NaN / Inf policy of the ops: propagate like PyTorch; -inf rows and C = 1 are defined
# --------------------------------------------------------------------------------------------
class TestNaNPolicy:
    def test_all_minus_inf_row_is_nan_like_torch_softmax(self):
        x = torch.randn(3, 6)
        x[1] = -INF
        h = softmax_entropy(x)
        assert math.isnan(h[1].item())
        assert torch.isfinite(h[[0, 2]]).all()
        assert torch.isnan(torch.softmax(x[1], -1)).all()  # what PyTorch gives for the same row

    def test_single_class_is_zero(self):
        x = torch.randn(5, 1) * 100
        assert torch.equal(softmax_entropy(x), torch.zeros(5))
        torch.testing.assert_close(softmax_entropy(x), entropy_reference(x))

    def test_single_class_coefficients_are_uniform(self):
        # Both models have zero entropy, so neither is more confident: lambda = 1/2.
        c = entropy_coefficients(torch.randn(2, 4, 1)).coefficients
        torch.testing.assert_close(c, torch.full((4, 2), 0.5))

    def test_partial_minus_inf_is_entropy_of_the_rest(self):
        # Masked classes have probability 0 and add nothing (the eager reference gives 0 * -inf = NaN here).
        x = torch.randn(4, 7)
        x[:, 2] = -INF
        expected = entropy_reference(torch.cat([x[:, :2], x[:, 3:]], 1))
        torch.testing.assert_close(softmax_entropy(x), expected)

    @pytest.mark.parametrize("bad", [NAN, INF])
    def test_nan_or_plus_inf_gives_nan_only_in_that_row(self, bad):
        x = torch.randn(4, 9)
        x[2, 5] = bad
        h = softmax_entropy(x)
        assert torch.isnan(h[2])
        torch.testing.assert_close(h[[0, 1, 3]], entropy_reference(x[[0, 1, 3]]))
        assert torch.isnan(entropy_reference(x[2:3])).all()  # PyTorch agrees

    def test_nan_logits_give_nan_coefficients_of_that_sample(self):
        x = torch.randn(2, 5, 4)
        x[1, 3, 0] = NAN
        c, h = entropy_coefficients(x)
        assert torch.isnan(c[3]).all() and torch.isnan(h[1, 3])
        assert torch.isfinite(c[[0, 1, 2, 4]]).all()

    def test_nan_logits_with_offset_poison_the_batch_like_torch_statistics(self):
        x = torch.randn(2, 5, 4)
        x[0, 1, 2] = NAN
        c, _ = entropy_coefficients(x, offset_adjustment=True)
        assert torch.isnan(c).all()  # b and w are batch statistics, as torch.std/mean would give

    def test_blend_propagates_nan_even_with_zero_weight(self):
        a, b = _sd(), _sd(seed=1)
        b["linear.bias"][2] = NAN
        out = blend([a, b], [[1.0, 0.0]])[0]
        ref = (1.0 * a["linear.bias"]) + 0.0 * b["linear.bias"]
        assert torch.isnan(out["linear.bias"][2]) and torch.isnan(ref[2])
        torch.testing.assert_close(out["linear.weight"], a["linear.weight"])

    def test_blend_propagates_inf(self):
        a, b = _sd(), _sd(seed=1)
        a["norm.weight"][0] = INF
        out = blend([a, b], [[0.25, 0.75]])[0]
        assert out["norm.weight"][0].item() == INF

    def test_sample_combine_nan_weight_poisons_only_that_sample(self):
        x = torch.randn(3, 2, 4, 5)
        w = torch.rand(3, 4)
        w[1, 2] = NAN
        y = sample_combine(x, w)
        assert torch.isnan(y[1]).all()
        assert torch.isfinite(y[[0, 2]]).all()


def test_error_messages_start_with_the_function_name():
    for name, thunk, _, _ in CASES:
        if not name.startswith(("entropy-", "coef-", "blend-", "interp-", "combine-")):
            continue
        with pytest.raises((ValueError, TypeError)) as info:
            thunk()
        prefix = {
            "entropy": "softmax_entropy",
            "coef": "entropy_coefficients",
            "blend": "blend",
            "interp": "interpolation",
            "combine": "sample_combine",
        }[name.split("-")[0]]
        msg = str(info.value)
        if isinstance(info.value, IncompatibleStateDictsError):
            continue  # names the key and both state dicts instead
        assert re.search(rf"\b{prefix}\b", msg), f"{name}: {msg!r} does not name {prefix}"


# --------------------------------------------------------------------------------------------
# High-level API: WiSE-FT, DaWin, AdaWiSE, multi-task DaWin, mixtures, checkpoints
# --------------------------------------------------------------------------------------------
def _mod(name):
    # The package's own modules: an import failure is a failure, never a skip.
    return importlib.import_module(f"dawin_ext.{name}")


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 4)
    ).eval()


def _tiny_int_buffer(seed: int, steps: int) -> torch.nn.Module:
    m = _tiny(seed)
    m.register_buffer("steps", torch.tensor([steps]))  # an integer entry: it cannot be interpolated
    return m


def _tiny_sd(seed: int, **overrides):
    sd = dict(_tiny(seed).state_dict())
    for key, value in overrides.items():
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    return sd


def _poisoned(seed: int, key: str, index, value: float):
    sd = _tiny_sd(seed)
    t = sd[key].clone()
    t[index] = value
    sd[key] = t
    return sd


def _batches(n=24, batch=8, features=6, nan_at=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    if nan_at is not None:
        x[nan_at, 0] = NAN
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


class _ClassCountFlipper(torch.nn.Module):
    """Returns 4 classes on odd calls and 3 on even ones, like a loader mixing two datasets' heads."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        z = self.lin(x)
        return z if self.calls % 2 else z[:, :3]


def _dawin(**kw):
    return _mod("methods.dawin").DaWin(_tiny(0), _tiny_sd(1), _tiny_sd(2), **kw)


def _fitted_dawin():
    return _dawin(n_clusters=2).fit(_batches())


def _tiny_prelu(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.PReLU(), torch.nn.Linear(8, 4))


def _interpolator():
    return _mod("exact").SampleWiseInterpolator(_tiny_prelu(0), [_tiny_prelu(1), _tiny_prelu(2)])


def _unsafe_checkpoint():
    import tempfile

    path = tempfile.mktemp(suffix=".pt")
    torch.save(_tiny(0), path)  # a whole module: unpickling it needs arbitrary code
    return path


HIGH_LEVEL_CASES = [
    # ---- wise_ft
    (
        "wise-alpha-nan",
        lambda: _mod("methods.wise_ft").wise_ft(_tiny_sd(0), _tiny_sd(1), NAN),
        ValueError,
        r"alpha .*finite",
    ),
    (
        "wise-key-mismatch",
        lambda: _mod("methods.wise_ft").wise_ft(_tiny_sd(0), _tiny_sd(1, **{"3.bias": None}), 0.5),
        IncompatibleStateDictsError,
        r"theta_1 is missing key '3\.bias'",
    ),
    (
        "wise-shape-mismatch",
        lambda: _mod("methods.wise_ft").wise_ft(_tiny_sd(0), _tiny_sd(1, **{"3.bias": torch.zeros(5)}), 0.5),
        IncompatibleStateDictsError,
        r"'3\.bias': theta_0 has shape \(4,\) but theta_1 has \(5,\)",
    ),
    (
        "wise-nan-weight",
        lambda: _mod("methods.wise_ft").wise_ft(_tiny_sd(0), _poisoned(1, "0.weight", (1, 2), NAN), 0.5),
        ValueError,
        r"theta_1.*'0\.weight'",
    ),
    (
        "wise-inf-weight-alpha-0",
        lambda: _mod("methods.wise_ft").wise_ft(_tiny_sd(0), _poisoned(1, "3.bias", 2, INF), 0.0),
        ValueError,
        r"theta_1.*'3\.bias'",
    ),
    (
        "wise-fisher-alpha-out-of-range",
        lambda: _mod("methods.wise_ft").wise_ft(_tiny_sd(0), _tiny_sd(1), 1.5, fishers=({}, {})),
        ValueError,
        r"alpha in \[0, 1\], got 1\.5",
    ),
    (
        "wise-fisher-floor",
        lambda: _mod("methods.wise_ft").wise_ft(_tiny_sd(0), _tiny_sd(1), 0.5, fishers=({}, {}), fisher_floor=0.0),
        ValueError,
        r"fisher_floor must be > 0",
    ),
    (
        "wise-fisher-nan",
        lambda: _mod("methods.wise_ft").wise_ft(
            _tiny_sd(0), _tiny_sd(1), 0.5, fishers=({"0.bias": torch.full((8,), NAN)}, {"0.bias": torch.ones(8)})
        ),
        ValueError,
        r"fishers\[0\]\['0\.bias'\].*NaN",
    ),
    (
        "wise-fisher-one-sided",
        lambda: _mod("methods.wise_ft").wise_ft(_tiny_sd(0), _tiny_sd(1), 0.5, fishers=({}, {"0.bias": torch.ones(8)})),
        ValueError,
        r"'0\.bias' has a Fisher only in fishers\[1\]",
    ),
    (
        "wise-fisher-shape",
        lambda: _mod("methods.wise_ft").wise_ft(
            _tiny_sd(0), _tiny_sd(1), 0.5, fishers=({"0.bias": torch.ones(7)}, {"0.bias": torch.ones(7)})
        ),
        ValueError,
        r"fishers\[0\]\['0\.bias'\] has shape \(7,\), parameter has \(8,\)",
    ),
    (
        "wise-fisher-unknown-key",
        lambda: _mod("methods.wise_ft").wise_ft(
            _tiny_sd(0), _tiny_sd(1), 0.5, fishers=({"head.w": torch.ones(1)}, {"head.w": torch.ones(1)})
        ),
        ValueError,
        r"'head\.w' that theta_0 lacks",
    ),
    (
        "wise-sweep-no-alphas",
        lambda: _mod("methods.wise_ft").wise_ft_sweep(_tiny(0), _tiny_sd(0), _tiny_sd(1), [], lambda m: 0),
        ValueError,
        r"at least one alpha",
    ),
    (
        "output-ensemble-class-counts",
        lambda: _mod("methods.wise_ft").output_ensemble(torch.randn(3, 4), torch.randn(3, 5)),
        ValueError,
        r"shapes differ: \(3, 4\) vs \(3, 5\)",
    ),
    (
        "output-ensemble-temperature",
        lambda: _mod("methods.wise_ft").output_ensemble(torch.randn(3, 4), torch.randn(3, 4), temperatures=(0.0, 1.0)),
        ValueError,
        r"temperatures must be finite and > 0",
    ),
    (
        "output-ensemble-nan-logits",
        lambda: _mod("methods.wise_ft").output_ensemble(
            torch.randn(3, 4), torch.tensor([[0.0] * 4, [0.0] * 4, [NAN] * 4])
        ),
        ValueError,
        r"sample 2",
    ),
    (
        "output-ensemble-weight-shape",
        lambda: _mod("methods.wise_ft").output_ensemble(torch.randn(3, 4), torch.randn(3, 4), torch.rand(5)),
        ValueError,
        r"output_ensemble: .*weight",
    ),
    (
        "fisher-empty-loader",
        lambda: _mod("methods.wise_ft").diagonal_fisher(_tiny(0), []),
        ValueError,
        r"diagonal_fisher: the loader yielded no samples",
    ),
    # ---- DaWin
    ("dawin-temperature-zero", lambda: _dawin(temperatures=(0.0, 1.0)), ValueError, r"temperatures .*> 0"),
    ("dawin-temperature-negative", lambda: _dawin(temperatures=(1.0, -2.0)), ValueError, r"-2\.0"),
    ("dawin-three-temperatures", lambda: _dawin(temperatures=(1, 1, 1)), ValueError, r"two temperatures"),
    ("dawin-no-clusters", lambda: _dawin(n_clusters=0), ValueError, r"n_clusters must be >= 1, got 0"),
    (
        "dawin-more-clusters-than-samples",
        lambda: _dawin(n_clusters=5).fit(_batches(n=4, batch=2)),
        ValueError,
        r"n_components=5 is more than the 4 samples",
    ),
    ("dawin-empty-loader", lambda: _dawin().fit([]), ValueError, r"loader yielded no samples"),
    ("dawin-unknown-expertise", lambda: _dawin(expertise="vibes"), ValueError, r"unknown expertise 'vibes'"),
    (
        "dawin-key-mismatch",
        lambda: _mod("methods.dawin").DaWin(_tiny(0), _tiny_sd(1), _tiny_sd(2, **{"3.bias": None})),
        IncompatibleStateDictsError,
        r"theta_ft is missing key '3\.bias'",
    ),
    (
        "dawin-dtype-mismatch",
        lambda: _mod("methods.dawin").DaWin(_tiny(0), _tiny_sd(1), _tiny_sd(2, **{"3.bias": torch.zeros(4).half()})),
        IncompatibleStateDictsError,
        r"'3\.bias'.*torch\.float32.*torch\.float16",
    ),
    (
        "dawin-nan-sample",
        lambda: _dawin().fit(_batches(nan_at=11)),
        ValueError,
        r"sample 11",
    ),
    (
        "dawin-predict-nan-sample",
        lambda: _fitted_dawin().predict(_batches(nan_at=5)[0][0]),
        ValueError,
        r"sample 5",
    ),
    (
        "dawin-nan-weight",
        lambda: (
            _mod("methods.dawin").DaWin(_tiny(0), _tiny_sd(1), _poisoned(2, "0.weight", (1, 2), NAN)).fit(_batches())
        ),
        ValueError,
        r"theta_ft.*'0\.weight'",
    ),
    (
        "dawin-class-counts-change",
        lambda: (
            _mod("methods.dawin").DaWin(_ClassCountFlipper(), *(_ClassCountFlipper().state_dict(),) * 2).fit(_batches())
        ),
        ValueError,
        r"batch \d has 3 classes but earlier logits had 4",
    ),
    ("dawin-predict-before-fit", lambda: _dawin().predict(torch.randn(2, 6)), RuntimeError, r"call fit"),
    ("dawin-bad-mode", lambda: _fitted_dawin().predict(torch.randn(2, 6), mode="fast"), ValueError, r"'fast'"),
    (
        "dawin-predict-dataset-length",
        lambda: _fitted_dawin().predict_dataset(_batches(n=16)),
        ValueError,
        r"16 samples but fit saw 24",
    ),
    (
        "dawin-coefficients-class-counts",
        lambda: _mod("methods.dawin").dawin_coefficients(torch.randn(3, 4), torch.randn(3, 5)),
        ValueError,
        r"same number of classes",
    ),
    (
        "dawin-coefficients-no-samples",
        lambda: _mod("methods.dawin").dawin_coefficients(torch.randn(0, 4), torch.randn(0, 4)),
        ValueError,
        r"no samples",
    ),
    (
        "dawin-coefficients-all-minus-inf-row",
        lambda: _mod("methods.dawin").dawin_coefficients(
            torch.randn(3, 4), torch.tensor([[0.0, 1, 2, 3], [0, 1, 2, 3], [-INF] * 4])
        ),
        ValueError,
        r"fine-tuned model: logits of sample 2",
    ),
    (
        "dawin-coefficients-nan-offset",
        lambda: _mod("methods.dawin").dawin_coefficients(torch.randn(3, 4), torch.randn(3, 4), offset=(NAN, 2.0)),
        ValueError,
        r"offset",
    ),
    (
        "dawin-coefficients-offset-one-sample",
        lambda: _mod("methods.dawin").dawin_coefficients(torch.randn(1, 4), torch.randn(1, 4), offset=True),
        ValueError,
        r"at least 2 samples",
    ),
    # ---- AdaWiSE
    (
        "adawise-n-init",
        lambda: _mod("methods.adawise").AdaWiSE(_tiny(0), _tiny_sd(1), _tiny_sd(2), n_init=0),
        ValueError,
        r"n_init must be >= 1",
    ),
    (
        "adawise-budget",
        lambda: _mod("methods.adawise").AdaWiSE(_tiny(0), _tiny_sd(1), _tiny_sd(2), n_evals=2, n_init=3),
        ValueError,
        r"n_evals \(2\) must be >= n_init \(3\)",
    ),
    (
        "adawise-empty-batch",
        lambda: _mod("methods.adawise").AdaWiSE(_tiny(0), _tiny_sd(1), _tiny_sd(2)).predict(torch.randn(0, 6)),
        ValueError,
        r"empty batch",
    ),
    (
        "adawise-empty-loader",
        lambda: _mod("methods.adawise").AdaWiSE(_tiny(0), _tiny_sd(1), _tiny_sd(2)).predict_dataset([]),
        ValueError,
        r"no batches",
    ),
    (
        "adawise-nan-sample",
        lambda: _mod("methods.adawise").AdaWiSE(_tiny(0), _tiny_sd(1), _tiny_sd(2)).predict(_batches(nan_at=5)[0][0]),
        ValueError,
        r"sample 5",
    ),
    (
        "adawise-nan-weight",
        lambda: (
            _mod("methods.adawise")
            .AdaWiSE(_tiny(0), _tiny_sd(1), _poisoned(2, "3.weight", (0, 0), INF))
            .predict(torch.randn(4, 6))
        ),
        ValueError,
        r"theta_ft.*'3\.weight'",
    ),
    (
        "adawise-key-mismatch",
        lambda: _mod("methods.adawise").AdaWiSE(_tiny(0), _tiny_sd(1), _tiny_sd(2, **{"0.bias": None})),
        IncompatibleStateDictsError,
        r"missing key '0\.bias'",
    ),
    # ---- multi-task DaWin
    (
        "multitask-no-tasks",
        lambda: _mod("methods.multitask").DaWinMultiTask(_tiny(0), _tiny_sd(0), []),
        ValueError,
        r"got 0",
    ),
    (
        "multitask-both-task-forms",
        lambda: _mod("methods.multitask").DaWinMultiTask(_tiny(0), _tiny_sd(0)),
        ValueError,
        r"exactly one of task_thetas and task_vectors",
    ),
    (
        "multitask-key-mismatch",
        lambda: _mod("methods.multitask").DaWinMultiTask(_tiny(0), _tiny_sd(0), [_tiny_sd(1, **{"3.bias": None})]),
        IncompatibleStateDictsError,
        r"'3\.bias'",
    ),
    (
        "multitask-empty-loader",
        lambda: _mod("methods.multitask").DaWinMultiTask(_tiny(0), _tiny_sd(0), [_tiny_sd(1), _tiny_sd(2)]).fit([]),
        ValueError,
        r"no samples",
    ),
    (
        "multitask-nan-sample",
        lambda: (
            _mod("methods.multitask")
            .DaWinMultiTask(_tiny(0), _tiny_sd(0), [_tiny_sd(1), _tiny_sd(2)])
            .fit(_batches(nan_at=11))
        ),
        ValueError,
        r"sample 11",
    ),
    # ---- mixtures
    ("beta-no-components", lambda: _mod("methods.mixture").BetaMixture(n_components=0), ValueError, r">= 1, got 0"),
    (
        "beta-more-components-than-samples",
        lambda: _mod("methods.mixture").BetaMixture(n_components=3).fit([0.1, 0.2]),
        ValueError,
        r"n_components=3 is more than the 2 samples",
    ),
    ("beta-empty", lambda: _mod("methods.mixture").BetaMixture().fit([]), ValueError, r"no samples"),
    (
        "beta-nan",
        lambda: _mod("methods.mixture").BetaMixture().fit([0.1, NAN, 0.3, 0.5]),
        ValueError,
        r"sample 1 is nan",
    ),
    (
        "beta-outside",
        lambda: _mod("methods.mixture").BetaMixture().fit([0.1, 0.3, 1.5]),
        ValueError,
        r"sample 2 is 1\.5",
    ),
    ("beta-2d", lambda: _mod("methods.mixture").BetaMixture().fit(np.zeros((3, 2))), ValueError, r"1-D.*\(3, 2\)"),
    ("beta-unfitted", lambda: _mod("methods.mixture").BetaMixture().predict([0.1]), RuntimeError, r"fit\(\)"),
    (
        "dirichlet-not-simplex",
        lambda: _mod("methods.mixture").DirichletMixture().fit(np.array([[0.5, 0.6], [0.2, 0.8]])),
        ValueError,
        r"sample 0 sums to 1\.1",
    ),
    (
        "dirichlet-negative",
        lambda: _mod("methods.mixture").DirichletMixture().fit(np.array([[0.2, 0.8], [1.5, -0.5]])),
        ValueError,
        r"sample 1 has negative entry",
    ),
    # ---- exact per-sample interpolation
    (
        "samplewise-coefficient-shape",
        lambda: _interpolator()(torch.randn(3, 6), torch.full((3, 3), 1 / 3)),
        ValueError,
        r"coefficients must have shape \[B, 2\].*\(3, 3\)",
    ),
    (
        "samplewise-coefficient-nan",
        lambda: _interpolator()(torch.randn(3, 6), torch.tensor([[0.3, 0.7], [NAN, 0.5], [0.5, 0.5]])),
        ValueError,
        r"finite; entry \(1, 0\) is nan",
    ),
    (
        "samplewise-row-sum",
        lambda: _interpolator()(torch.randn(3, 6), torch.tensor([[0.3, 0.7], [0.3, 0.5], [0.5, 0.5]])),
        ValueError,
        r"row 1 sums to 0\.8",
    ),
    (
        "samplewise-batch-mismatch",
        lambda: _interpolator()(torch.randn(3, 6), torch.tensor([[0.3, 0.7]] * 2)),
        ValueError,
        r"batch size 3 but coefficients have 2 rows",
    ),
    (
        "samplewise-integer-coefficients",
        lambda: _interpolator()(torch.randn(3, 6), torch.ones(3, 2, dtype=torch.long)),
        TypeError,
        r"floating point, got torch\.int64",
    ),
    (
        # Integer entries cannot be interpolated; a PReLU slope that differs is now merged per sample instead.
        "samplewise-unsupported-parameter",
        lambda: _mod("exact").SampleWiseInterpolator(
            _tiny_int_buffer(0, 1), [_tiny_int_buffer(1, 1).state_dict(), _tiny_int_buffer(2, 2).state_dict()]
        ),
        ValueError,  # UnsupportedParameterError
        r"non-floating-point entry 'steps' differs",
    ),
    (
        "samplewise-key-mismatch",
        lambda: _mod("exact").SampleWiseInterpolator(_tiny(0), [_tiny_sd(1), _tiny_sd(2, **{"3.bias": None})]),
        ValueError,
        r"source 1 is missing key '3\.bias'",
    ),
    # ---- checkpoints
    (
        "checkpoint-unsafe-pickle",
        lambda: _mod("integrations.checkpoints").load_state_dict(_unsafe_checkpoint()),
        pickle.UnpicklingError,
        r"trust_pickle=True",
    ),
    (
        "checkpoint-missing",
        lambda: _mod("integrations.checkpoints").load_state_dict("/nonexistent/weights.safetensors"),
        FileNotFoundError,
        r"does not exist",
    ),
    (
        "checkpoint-empty-save",
        lambda: _mod("integrations.checkpoints").save_state_dict("/tmp/never-written.safetensors", {}),
        ValueError,
        r"empty state dict",
    ),
]


@pytest.mark.parametrize(
    ("thunk", "exc", "match"), [c[1:] for c in HIGH_LEVEL_CASES], ids=[c[0] for c in HIGH_LEVEL_CASES]
)
def test_bad_input_high_level(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_fisher_merge_of_float64_weights_is_computed_in_float64():
    # float64 weights get a real Fisher merge in float64 (never theta_0 copied through, never float32 rounding);
    # a key without a Fisher entry is plain interpolation.
    wise_ft = _mod("methods.wise_ft")
    sd0 = {k: v.double() if v.is_floating_point() else v for k, v in _tiny_sd(0).items()}
    sd1 = {k: v.double() if v.is_floating_point() else v for k, v in _tiny_sd(1).items()}
    g = torch.Generator().manual_seed(4)
    f0, f1 = torch.rand(8, 6, generator=g, dtype=torch.float64), torch.rand(8, 6, generator=g, dtype=torch.float64)
    f0[0, 0] = 0.0  # below the floor
    merged = wise_ft.wise_ft(sd0, sd1, 0.3, fishers=({"0.weight": f0}, {"0.weight": f1}))
    c0, c1 = 0.7 * f0.clamp_min(1e-8), 0.3 * f1.clamp_min(1e-8)
    expected = (c0 * sd0["0.weight"] + c1 * sd1["0.weight"]) / (c0 + c1)
    assert merged["0.weight"].dtype == torch.float64
    torch.testing.assert_close(merged["0.weight"], expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(merged["3.bias"], 0.7 * sd0["3.bias"] + 0.3 * sd1["3.bias"], rtol=1e-15, atol=1e-15)
    assert not torch.equal(merged["0.weight"], sd0["0.weight"])


# --------------------------------------------------------------------------------------------
# Mixture fitting on degenerate data: no NaN parameters, no crash
# --------------------------------------------------------------------------------------------
def _assert_sane_beta_mixture(bm, values, k):
    for name in ("weights_", "alphas_", "betas_", "means_"):
        p = np.asarray(getattr(bm, name))
        assert p.shape == (k,), f"{name} has shape {p.shape}"
        assert np.isfinite(p).all(), f"{name} = {p}"
    assert (bm.alphas_ > 0).all() and (bm.betas_ > 0).all()
    assert ((bm.means_ >= 0) & (bm.means_ <= 1)).all()
    np.testing.assert_allclose(bm.weights_.sum(), 1.0, rtol=1e-9)
    proba = bm.predict_proba(values)
    assert np.isfinite(proba).all()
    labels = bm.predict(values)
    assert labels.shape == (len(values),) and ((labels >= 0) & (labels < k)).all()


class TestMixtureEdgeCases:
    @pytest.mark.parametrize("k", [1, 3])
    @pytest.mark.parametrize("value", [0.0, 0.4, 0.5, 1.0])
    def test_all_lambda_equal(self, k, value):
        values = np.full(12, value)
        bm = _mod("methods.mixture").BetaMixture(n_components=k).fit(values)
        _assert_sane_beta_mixture(bm, values, k)
        np.testing.assert_allclose(bm.means_[bm.predict(values)], value, atol=1e-3)

    @pytest.mark.parametrize("k", [2, 3])
    def test_lambda_exactly_zero_and_one(self, k):
        values = np.array([0.0] * 6 + [1.0] * 6 + [0.5] * (k - 2))
        bm = _mod("methods.mixture").BetaMixture(n_components=k).fit(values)
        _assert_sane_beta_mixture(bm, values, k)
        means = bm.means_[bm.predict(np.array([0.0, 1.0]))]
        assert means[0] < 0.01 and means[1] > 0.99

    @pytest.mark.parametrize("seed", range(4))
    def test_component_that_ends_up_empty(self, seed):
        # One tight cluster and a lone outlier: with K = 3 one component has (almost) nothing to explain.
        rng = np.random.default_rng(seed)
        values = np.concatenate([0.3 + 1e-4 * rng.standard_normal(40), [0.95]])
        bm = _mod("methods.mixture").BetaMixture(n_components=3, seed=seed).fit(values)
        _assert_sane_beta_mixture(bm, values, 3)
        assert (bm.weights_ > 0).all()

    @pytest.mark.parametrize(("values", "k"), [([0.2, 0.7], 1), ([0.2, 0.7], 2), ([0.0, 1.0], 2), ([0.3, 0.3], 2)])
    def test_two_samples(self, values, k):
        values = np.array(values)
        bm = _mod("methods.mixture").BetaMixture(n_components=k).fit(values)
        _assert_sane_beta_mixture(bm, values, k)

    def test_dawin_with_identical_models_fits(self):
        # theta_zs == theta_ft gives lambda = 1/2 for every sample: the default K = 3 must still work.
        dawin = _mod("methods.dawin")
        sd = _tiny_sd(1)
        d = dawin.DaWin(_tiny(0), sd, sd).fit(_batches())
        torch.testing.assert_close(d.coefficients_, torch.full((24,), 0.5))
        assert np.isfinite(d.cluster_coefficients_.numpy()).all()
        ref = _tiny(1)
        x = _batches()[0][0]
        torch.testing.assert_close(d.predict(x), ref(x))

    @pytest.mark.parametrize("k", [1, 2])
    def test_dirichlet_degenerate_rows(self, k):
        # One-hot rows (exact zeros), repeated rows and only two samples.
        pi = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]] * 3)
        dm = _mod("methods.mixture").DirichletMixture(n_components=k).fit(pi)
        assert np.isfinite(dm.params_).all() and np.isfinite(dm.weights_).all()
        assert np.isfinite(dm.predict_proba(pi)).all()
        dm2 = _mod("methods.mixture").DirichletMixture(n_components=1).fit(pi[:2])
        assert np.isfinite(dm2.params_).all()


def test_samplewise_refuses_nan_weights_naming_the_key() -> None:
    from dawin_ext import SampleWiseInterpolator

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    zs = {k: v.clone() for k, v in model.state_dict().items()}
    ft = {k: v.clone() for k, v in zs.items()}
    ft["0.bias"][1] = float("nan")
    with pytest.raises(ValueError, match=r"source 1\['0.bias'\] holds a non-finite value"):
        SampleWiseInterpolator(model, [zs, ft])


def test_dawin_oracle_labels_out_of_range_name_the_sample() -> None:
    from dawin_ext.methods.dawin import dawin_coefficients

    zs, ft = torch.randn(5, 3), torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match=r"label of sample 3 is 3, outside \[0, 3\)"):
        dawin_coefficients(zs, ft, expertise="cross_entropy", pseudo_label="true", labels=labels)
