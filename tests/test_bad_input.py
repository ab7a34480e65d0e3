"""Bad input across the public API: every case asserts the exception type and what the message names.

Policy (docs/errors.md): an unsupported dtype or a wrong kind of object raises TypeError; every other
bad argument (shape, count, value, device, incompatible state dicts) raises ValueError. The message
starts with the function's name and names the offending key, sample, shape, dtype or device.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from dawin_ext import blend, entropy_coefficients, interpolation, sample_combine, softmax_entropy
from dawin_ext.reference import entropy_reference
from dawin_ext.statedict import IncompatibleStateDictsError, as_state_dict, check_compatible

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
        "blend-float64",
        lambda: blend([_sd(torch.float64), _sd(torch.float64, seed=1)], [0.5, 0.5]),
        TypeError,
        r"key 'linear\.weight' has dtype torch\.float64",
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


def test_at_least_40_distinct_cases():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids)
    assert len(ids) >= 40


@pytest.mark.parametrize(("thunk", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_incompatible_state_dicts_are_value_errors():
    # Servers can catch every bad-argument error of the API as ValueError or TypeError.
    assert issubclass(IncompatibleStateDictsError, ValueError)


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
