"""Typed Python wrappers around the compiled ops in ``torch.ops.dawin_ext``.

Every op has a CPU kernel and (in a CUDA build) a CUDA kernel with the same schema, plus a fake
implementation so that ``torch.compile`` can trace it. There is no silent fallback to plain PyTorch:
if the compiled core is missing, importing ``dawin_ext`` fails with a message that says how to build it.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import _loader  # noqa: F401  (loads the library that registers torch.ops.dawin_ext)
from .statedict import StateDict, as_state_dict, check_compatible, check_finite_matrix

_ops = torch.ops.dawin_ext

#: dtypes that ``blend`` interpolates; every other dtype is copied from source 0.
BLENDABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MAX_CLUSTERS_PER_LAUNCH = 16
_MAX_SOURCES = 16


# --------------------------------------------------------------------------------------------
# softmax_entropy
# --------------------------------------------------------------------------------------------
def softmax_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits / temperature)`` along the last dim.

    Accepts float32, float16 or bfloat16 with any leading shape and any strides; accumulates and
    returns float32 of shape ``logits.shape[:-1]``. Differentiable with respect to ``logits``.

    A row whose entries are all ``-inf`` has no softmax distribution and gives NaN (as PyTorch's
    softmax does); NaN or ``+inf`` in a row gives NaN. A single-class row has entropy 0.
    """
    return _ops.softmax_entropy(logits, float(temperature))


@torch.library.register_fake("dawin_ext::softmax_entropy")
def _softmax_entropy_fake(logits: Tensor, temperature: float = 1.0) -> Tensor:
    torch._check(logits.dim() >= 1, lambda: "softmax_entropy: logits must have at least one dimension")
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


def _softmax_entropy_setup_context(ctx, inputs, output) -> None:
    logits, temperature = inputs
    ctx.save_for_backward(logits, output)
    ctx.temperature = temperature


def _softmax_entropy_backward(ctx, grad: Tensor):
    # dH/dz_i = -p_i (log p_i + H) for z = x / T, so dH/dx_i = -p_i (log p_i + H) / T.
    logits, entropy = ctx.saved_tensors
    t = ctx.temperature
    z = logits.float() / t
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    # p == 0 entries (from -inf logits) contribute nothing; avoid 0 * -inf.
    term = torch.where(p > 0, p * (logp + entropy.unsqueeze(-1)), torch.zeros_like(p))
    grad_logits = -(grad.unsqueeze(-1) * term) / t
    return grad_logits.to(logits.dtype), None


torch.library.register_autograd(
    "dawin_ext::softmax_entropy", _softmax_entropy_backward, setup_context=_softmax_entropy_setup_context
)


# --------------------------------------------------------------------------------------------
# entropy_coefficients
# --------------------------------------------------------------------------------------------
class EntropyCoefficients(NamedTuple):
    """Result of :func:`entropy_coefficients`.

    ``coefficients`` is [B, M]: each row sums to 1; with M = 2 (zero-shot, fine-tuned) column 1 is
    DaWin's lambda, the weight on the fine-tuned model. ``entropies`` is [M, B].
    """

    coefficients: Tensor
    entropies: Tensor


def entropy_coefficients(
    logits: Tensor | Sequence[Tensor],
    temperatures: Sequence[float] | None = None,
    offset_adjustment: bool = False,
) -> EntropyCoefficients:
    """DaWin's expertise step, fused: per-model softmax entropies and normalized exp(-H) weights.

    Args:
        logits: ``[M, B, C]`` stacked logits of M models on the same batch, or a list of M ``[B, C]``.
        temperatures: one temperature per model (applied to the entropy only); default all 1.
        offset_adjustment: apply the reference code's per-domain offset, computed from the entropies'
            means and (unbiased) standard deviations over the batch. Needs M = 2 and B >= 2.
    """
    if not isinstance(logits, Tensor):
        logits = list(logits)
        if not logits:
            raise ValueError("entropy_coefficients: got an empty list of logits; need at least one model")
        shapes = {tuple(t.shape) for t in logits}
        if len(shapes) != 1:
            raise ValueError(f"entropy_coefficients: the models' logits have different shapes {sorted(shapes)}")
        devices = {str(t.device) for t in logits}
        if len(devices) != 1:
            raise ValueError(f"entropy_coefficients: the models' logits are on different devices {sorted(devices)}")
        logits = torch.stack(logits)
    temps = [] if temperatures is None else [float(t) for t in temperatures]
    coefficients, entropies = _ops.entropy_coefficients(logits, temps, bool(offset_adjustment))
    return EntropyCoefficients(coefficients, entropies)


def coefficients_from_entropies(entropies: Tensor, offset_adjustment: bool) -> Tensor:
    """``entropy_coefficients``' last step alone: [B, M] coefficients from [M, B] fp32 entropies.

    For entropies computed elsewhere (gathered from several processes): the compiled op runs the very ATen
    sequence the fused kernel ends with, so the result matches ``entropy_coefficients`` on one process bit for bit.
    """
    return _ops._coefficients_from_entropies(entropies, offset_adjustment)


@torch.library.register_fake("dawin_ext::entropy_coefficients")
def _entropy_coefficients_fake(logits: Tensor, temperatures: list[float], offset_adjustment: bool = False):
    torch._check(logits.dim() == 3, lambda: "entropy_coefficients: logits must be [M, B, C]")
    m, b = logits.shape[0], logits.shape[1]
    return logits.new_empty((b, m), dtype=torch.float32), logits.new_empty((m, b), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# blend
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("dawin_ext::blend_")
def _blend_fake(sources: list[Tensor], coefficients: Tensor, out: list[Tensor]) -> None:
    return None


def _as_coefficient_matrix(coefficients, num_sources: int) -> Tensor:
    try:
        coef = torch.as_tensor(coefficients, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"blend: coefficients must be a numeric [K, S] matrix, got {coefficients!r} ({exc})") from exc
    if coef.dim() == 1:
        coef = coef.unsqueeze(0)
    if coef.dim() != 2 or coef.shape[1] != num_sources:
        raise ValueError(
            f"blend: coefficients must have shape [K, S] with S = {num_sources} sources, got {tuple(coef.shape)}"
        )
    if coef.shape[0] < 1:
        raise ValueError("blend: coefficients must have at least one row (K >= 1)")
    check_finite_matrix(coef, "blend: coefficients")
    # Kept in float64: the kernel rounds once to float32 for fp32/fp16/bf16 tensors and uses the
    # exact values for float64 tensors.
    return coef


_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE_PAGE = 2 << 20
_libc = None


def _hint_huge_pages(t: Tensor) -> None:
    """Asks Linux to back a freshly allocated, not yet touched CPU tensor with transparent huge pages.

    Fresh outputs cost one page fault per 4 KiB on first touch; on this class of (virtual) machine
    that was the largest part of an allocating blend (see benchmarks/RESULTS.md). Only the 2 MiB
    aligned interior of the tensor's own memory is advised, so nothing outside it changes. This is a
    performance hint: where it is unavailable the result is the same, only slower.
    """
    global _libc
    if t.device.type != "cpu" or not sys.platform.startswith("linux") or t.nbytes < 2 * _HUGE_PAGE:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    stop = (t.data_ptr() + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if stop > start:
        _libc.madvise(start, stop - start, _MADV_HUGEPAGE)


def _new_output(t: Tensor) -> Tensor:
    o = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    _hint_huge_pages(o)
    return o


class _AliasPlan(NamedTuple):
    """What :func:`_plan_aliasing` decided for one ``blend(..., out=)`` call."""

    order: list[int]  # clusters in launch order; clusters writing into a source come last
    skip: set[str]  # tied keys written by copying their group's first key after the launches
    tied_to: dict[str, str]  # skipped key -> the key whose blend it takes
    snapshot: set[tuple[int, str]]  # (source, key) to copy before the first launch


def _same_values(x: Tensor, y: Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same values (NaN equal to NaN)."""
    if x.data_ptr() == y.data_ptr() and x.stride() == y.stride():
        return True
    if torch.equal(x, y):
        return True
    return x.is_floating_point() and bool(((x == y) | (x.isnan() & y.isnan())).all())


def _plan_aliasing(
    sources: list[StateDict], out: list[dict[str, Tensor]], keys: list[str], float_keys: set[str]
) -> _AliasPlan:
    """One overlap analysis over every (output, source) and (output, output) pair of the whole call.

    Runs before anything is written. The compiled ``_memory_overlaps`` finds the pairs (one sort and
    sweep); this function names their keys and decides:

    * an output that is exactly the source tensor of its own key (``out=[sources[0]]``) is an in-place
      blend. Within one launch the kernels read every source element before writing it; across
      launches (more than 16 clusters) the clusters that write into a source are launched last, or, when
      more than 16 clusters do, the aliased sources are copied once before the first launch;
    * keys of one output state dict that are the same tensor (tied weights) get one value: the group's
      first key is blended and the others are copied from it. That needs every source to hold equal
      values under those keys (the same tensor, or equal copies); otherwise ``ValueError``;
    * every other sharing (partial overlaps, views, an output that is another key's source, one tensor
      in two clusters' outputs) raises ``ValueError`` naming the keys.
    """
    num_sources, num_keys, num_clusters = len(sources), len(keys), len(out)
    read_only = num_sources * num_keys
    tensors = [sd[key] for sd in sources for key in keys] + [od[key] for od in out for key in keys]
    flat = _ops._memory_overlaps(tensors, read_only)
    source_out, ties = [], []
    for first, second, exact in zip(flat[0::3], flat[1::3], flat[2::3], strict=True):
        k, y = divmod(second - read_only, num_keys)  # the second of a pair is always an output
        if first < read_only:
            s, x = divmod(first, num_keys)
            source_out.append((s, keys[x], k, keys[y], bool(exact)))
            continue
        k0, y0 = divmod(first - read_only, num_keys)
        if k0 != k:
            raise ValueError(
                f"blend: out {k0} key {keys[y0]!r} and out {k} key {keys[y]!r} "
                + ("are the same tensor" if exact else "share memory")
                + "; each output state dict needs its own tensors (is one state dict passed twice in out?)"
            )
        if not exact:
            raise ValueError(
                f"blend: out {k} keys {keys[y0]!r} and {keys[y]!r} overlap in memory without being the same "
                "tensor (a partial overlap or different views); blend cannot write both"
            )
        ties.append((k, keys[y0], keys[y]))

    # Tied output keys: union-find over keys, the first key in state-dict order represents its group.
    position = {key: i for i, key in enumerate(keys)}
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.get(key, key) != key:
            key = parent[key]
        return key

    tie_cluster: dict[str, int] = {}
    for k, a, b in ties:
        ra, rb = root(a), root(b)
        if ra != rb:
            lo, hi = sorted((ra, rb), key=position.__getitem__)
            parent[hi] = lo
        tie_cluster.setdefault(a, k)
        tie_cluster.setdefault(b, k)
    tied_to = {key: root(key) for key in tie_cluster if root(key) != key}
    for key, rep in tied_to.items():
        # Non-floating keys are copied from source 0 only, so only source 0 has to agree for them.
        for s in range(num_sources if key in float_keys else 1):
            if not _same_values(sources[s][rep], sources[s][key]):
                raise ValueError(
                    f"blend: out {tie_cluster[key]} holds keys {rep!r} and {key!r} in the same memory (tied "
                    f"weights), but source {s} has different values under them, so their blends differ; untie "
                    "them in out, or pass sources whose tied keys hold the same values"
                )

    in_place: set[int] = set()
    aliased: set[tuple[int, str]] = set()
    for s, x, k, y, exact in source_out:
        # A skipped source key is never read (its group's first key is); a skipped output key is written
        # by a copy after every source has been read.
        if x in tied_to or y in tied_to:
            continue
        if exact and x == y:
            if x in float_keys:  # a non-floating key is a copy from source 0 onto itself
                in_place.add(k)
                aliased.add((s, x))
            continue
        raise ValueError(
            f"blend: out {k} key {y!r} "
            + ("is the same tensor as" if exact else "overlaps")
            + f" source {s} key {x!r}; an output may share memory with a source only by being that very "
            "tensor under the same key (an in-place blend). Views, partial overlaps and other keys' sources "
            "would be read after they were written"
        )

    order, snapshot = list(range(num_clusters)), set()
    if num_clusters > _MAX_CLUSTERS_PER_LAUNCH and in_place:
        if len(in_place) <= _MAX_CLUSTERS_PER_LAUNCH:
            order = [k for k in order if k not in in_place] + sorted(in_place)
        else:
            snapshot = aliased
    return _AliasPlan(order, set(tied_to), tied_to, snapshot)


def _launch_groups(order: list[int]) -> list[list[int]]:
    """Splits the clusters into launches of at most ``_MAX_CLUSTERS_PER_LAUNCH``, counted from the end,
    so that the last launch is a full one (it holds the in-place clusters that ``order`` puts last)."""
    groups, end = [], len(order)
    while end > 0:
        start = max(0, end - _MAX_CLUSTERS_PER_LAUNCH)
        groups.append(order[start:end])
        end = start
    return groups[::-1]


def blend(
    sources: Sequence[Mapping[str, Tensor]],
    coefficients,
    out: Sequence[dict[str, Tensor]] | None = None,
) -> list[dict[str, Tensor]]:
    """Builds K weighted blends of S parameter sets in one pass over the parameters.

    ``out[k][key] = sum_s coefficients[k, s] * sources[s][key]`` for every floating-point key
    (float32, float16, bfloat16 accumulated in float32; float64 accumulated in float64). Other keys
    (integer buffers and the like) are copied from source 0 and never blended; complex keys are refused.
    Fresh outputs are separate contiguous tensors (no shared storage, so safetensors can save them).

    Args:
        sources: S state dicts (or modules) with identical keys, shapes, dtypes and devices (checked first; the
            error names the first offending key).
        coefficients: ``[K, S]`` matrix (tensor, array or nested lists); a 1-D vector means K = 1.
        out: optional K state dicts whose existing tensors are overwritten in place (for example a
            live model's ``state_dict()``), so that repeated calls allocate nothing.

    Memory shared between ``out`` and the sources, or within ``out``, is analysed once before anything
    is written (see docs/errors.md, *Aliasing in blend*):

    * an output may be exactly the source tensor of its own key (``out=[sources[0], ...]``, an in-place
      blend), for any number of clusters;
    * keys of one output state dict that share one tensor (tied weights) all receive the same blend, if
      every source holds the same values under them; otherwise ``ValueError``;
    * any other sharing (partial overlaps, views, an output that is another key's source, one tensor in
      two clusters' outputs) raises ``ValueError`` naming the keys, and nothing is written.

    Returns:
        The K blended state dicts (``out`` itself when given).
    """
    if isinstance(sources, Mapping | torch.nn.Module):
        raise TypeError("blend: sources must be a sequence of state dicts; got a single one (wrap it in a list)")
    sources = [as_state_dict(sd, f"blend: source {s}") for s, sd in enumerate(sources)]
    if len(sources) < 1:
        raise ValueError("blend: need at least one source state dict")
    if len(sources) > _MAX_SOURCES:
        raise ValueError(f"blend: at most {_MAX_SOURCES} sources are supported per call, got {len(sources)}")
    keys = check_compatible(sources, names=[f"source {s}" for s in range(len(sources))])
    coef = _as_coefficient_matrix(coefficients, len(sources))
    k_total = coef.shape[0]
    ref = sources[0]
    fresh = out is None
    if fresh:
        out = [{key: _new_output(ref[key]) for key in keys} for _ in range(k_total)]
    else:
        out = list(out)
        if len(out) != k_total:
            raise ValueError(f"blend: out has {len(out)} state dicts but coefficients have K = {k_total} rows")
        check_compatible([ref, *out], names=["source 0", *[f"out {k}" for k in range(k_total)]], subset_ok=False)
        for k, od in enumerate(out):
            for key in keys:
                if not od[key].is_contiguous():
                    raise ValueError(
                        f"blend: out {k} tensor {key!r} is not contiguous; blend writes contiguous outputs"
                    )
    for key in keys:
        t = ref[key]
        if (t.is_floating_point() or t.is_complex()) and t.dtype not in BLENDABLE_DTYPES:
            # Copying such a key from source 0 would silently skip the interpolation.
            raise TypeError(
                f"blend: key {key!r} has dtype {t.dtype}; blend interpolates float32, float64, float16 and bfloat16 "
                "(convert the state dicts first, e.g. {k: v.float() for k, v in sd.items()})"
            )
    blendable = {key for key in keys if ref[key].dtype in BLENDABLE_DTYPES}
    # Fresh outputs share memory with nothing; given outputs are analysed before anything is written.
    plan = (
        _AliasPlan(list(range(k_total)), set(), {}, set()) if fresh else _plan_aliasing(sources, out, keys, blendable)
    )
    float_keys = [key for key in keys if key in blendable and key not in plan.skip]
    other_keys = [key for key in keys if key not in blendable and key not in plan.skip]
    with torch.no_grad():
        if float_keys:
            flat_sources = [
                sd[key].detach().clone() if (s, key) in plan.snapshot else sd[key].detach()
                for s, sd in enumerate(sources)
                for key in float_keys
            ]
            for group in _launch_groups(plan.order):
                flat_out = [out[k][key] for k in group for key in float_keys]
                _ops.blend_(flat_sources, coef[group].contiguous(), flat_out)
        for key in other_keys:
            for k in range(k_total):
                out[k][key].copy_(ref[key])
        for key, rep in plan.tied_to.items():  # tied keys: every source agrees, so the blend is the same
            for k in range(k_total):
                if out[k][key].data_ptr() != out[k][rep].data_ptr():
                    out[k][key].copy_(out[k][rep])
    return out


def interpolation(alpha, weight1: Mapping[str, Tensor], weight2: Mapping[str, Tensor]) -> StateDict:
    """Drop-in for the public DaWin/WiSE-FT reference ``interpolation(alpha, weight1, weight2)``.

    Returns ``{key: (1 - alpha) * weight1[key] + alpha * weight2[key]}`` over ``weight1``'s keys,
    computed by :func:`blend`. ``alpha`` may be a float or a 0-d tensor. One documented difference:
    non-floating keys (such as BatchNorm's ``num_batches_tracked``) are copied from ``weight1`` and
    keep their integer dtype, where the reference's arithmetic would turn them into floats.
    """
    if isinstance(alpha, Tensor) and alpha.numel() != 1:
        raise ValueError(f"interpolation: alpha must be a scalar, got a tensor of shape {tuple(alpha.shape)}")
    a = float(alpha.item() if isinstance(alpha, Tensor) else alpha)
    if not math.isfinite(a):
        raise ValueError(f"interpolation: alpha must be a finite number, got {a}")
    return blend([weight1, weight2], [[1.0 - a, a]])[0]


# --------------------------------------------------------------------------------------------
# sample_combine
# --------------------------------------------------------------------------------------------
def sample_combine(stacked: Tensor, weights: Tensor) -> Tensor:
    """Per-sample combination of S partial outputs.

    ``stacked`` is ``[B, M, S, N]`` (float32/float16/bfloat16), ``weights`` is ``[B, S]``; returns
    ``[B, M, N]`` with ``out[b, m, n] = sum_s weights[b, s] * stacked[b, m, s, n]`` accumulated in float32.
    This is the epilogue of the exact per-sample interpolation: one concatenated GEMM produces the S
    partial outputs side by side, and this kernel blends them per sample in one pass.
    """
    return _ops.sample_combine(stacked, weights)


@torch.library.register_fake("dawin_ext::sample_combine")
def _sample_combine_fake(stacked: Tensor, weights: Tensor) -> Tensor:
    torch._check(stacked.dim() == 4, lambda: "sample_combine: stacked must be [B, M, S, N]")
    # Mixed devices (e.g. one meta tensor) dispatch here; refuse them instead of returning garbage.
    torch._check_value(
        weights.device == stacked.device,
        lambda: f"sample_combine: weights are on {weights.device} but stacked is on {stacked.device}",
    )
    b, m, _, n = stacked.shape
    return stacked.new_empty((b, m, n))


def _sample_combine_setup_context(ctx, inputs, output) -> None:
    stacked, weights = inputs
    ctx.save_for_backward(stacked, weights)


def _sample_combine_backward(ctx, grad: Tensor):
    stacked, weights = ctx.saved_tensors
    g = grad.float()
    grad_stacked = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_stacked = (g[:, :, None, :] * weights.float()[:, None, :, None]).to(stacked.dtype)
    if ctx.needs_input_grad[1]:
        grad_weights = torch.einsum("bmn,bmsn->bs", g, stacked.float()).to(weights.dtype)
    return grad_stacked, grad_weights


torch.library.register_autograd(
    "dawin_ext::sample_combine", _sample_combine_backward, setup_context=_sample_combine_setup_context
)


# --------------------------------------------------------------------------------------------
# samplewise_linear
# --------------------------------------------------------------------------------------------
def _refuse_autograd(op: str, *tensors: Tensor | None) -> None:
    """The inference-only ops have no backward: refuse a call that autograd would record."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op} has no backward; call it under torch.no_grad() / torch.inference_mode() "
            "or with inputs that do not require grad"
        )


def samplewise_linear(input: Tensor, weights: Tensor, coefficients: Tensor, biases: Tensor | None = None) -> Tensor:
    """A linear layer whose weights are interpolated per sample: ``F.linear`` with ``W(c_b)`` for sample ``b``.

    ``input`` is ``[B, ..., IN]``, ``weights`` ``[S, OUT, IN]`` (S sources in ``nn.Linear`` layout),
    ``coefficients`` ``[B, S]`` and ``biases`` ``[S, OUT]`` or None. Returns ``[B, ..., OUT]`` with
    ``out[b] = input[b] @ (sum_s c[b, s] W_s)^T + sum_s c[b, s] bias_s``: exactly what merging the
    weights for sample ``b`` and running ``F.linear`` gives, up to rounding.

    On the CPU, for float32 with at least 10 rows (tokens) per sample, each sample's merged weights are
    formed block by block in cache and fed to oneDNN's brgemm micro-kernel, so the layer costs about
    one plain GEMM instead of S; with fewer rows (or one source) it is one brgemm GEMM over the sources'
    concatenated inputs ``[c_b0 x_b | c_b1 x_b | ...]`` (S times the FLOPs, no per-sample weights). Keep
    ``weights`` in the layout :func:`samplewise_linear_weights` builds to avoid a copy per call.
    float16/bfloat16 and CUDA compute the S partial outputs with S plain GEMMs and blend them per sample
    (fp32 accumulation). Inference only: no backward.
    """
    _refuse_autograd("samplewise_linear", input, weights, coefficients, biases)
    return _ops.samplewise_linear(input, weights, biases, coefficients)


def samplewise_linear_weights(weights: Sequence[Tensor]) -> Tensor:
    """Stacks S ``[OUT, IN]`` weights into the ``[S, OUT, IN]`` view :func:`samplewise_linear` reads fastest.

    The storage is ``[S, IN, OUT]`` (each source transposed), so the CPU kernel reads rows of ``W_s^T``
    in place; the returned tensor is its ``transpose(1, 2)`` view with the usual ``[S, OUT, IN]`` shape.
    """
    if len(weights) == 0:
        raise ValueError("samplewise_linear_weights: need at least one weight")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"samplewise_linear_weights: need S weights of one [OUT, IN] shape, got {sorted(shapes)}")
    return torch.stack([w.detach().t() for w in weights], 0).contiguous().transpose(1, 2)


def samplewise_linear_cpu_path() -> str:
    """The CPU path of float32 :func:`samplewise_linear` with >= 10 rows per sample: ``"brgemm"`` or ``"stacked"``."""
    return _ops._samplewise_linear_cpu_path()


def _fake_check_devices(op: str, input: Tensor, **tensors: Tensor | None) -> None:
    """A fake kernel's device check: every given (not None) tensor must be on ``input``'s device, as the real
    kernel requires; the message names the first one that is not."""
    for name, t in tensors.items():
        if t is not None:
            torch._check_value(
                t.device == input.device,
                lambda name=name, t=t: f"{op}: {name} are on {t.device} but input is on {input.device}",
            )


@torch.library.register_fake("dawin_ext::samplewise_linear")
def _samplewise_linear_fake(input: Tensor, weights: Tensor, biases: Tensor | None, coefficients: Tensor) -> Tensor:
    torch._check(input.dim() >= 2, lambda: "samplewise_linear: input must be [B, ..., IN]")
    torch._check(weights.dim() == 3, lambda: "samplewise_linear: weights must be [S, OUT, IN]")
    _fake_check_devices("samplewise_linear", input, weights=weights, coefficients=coefficients, biases=biases)
    return input.new_empty((*input.shape[:-1], weights.shape[1]))


# --------------------------------------------------------------------------------------------
# samplewise_depthwise_conv2d
# --------------------------------------------------------------------------------------------
def _pair(value: int | Sequence[int], name: str) -> list[int]:
    pair = [int(value)] * 2 if isinstance(value, int) else [int(v) for v in value]
    if len(pair) != 2:
        raise ValueError(f"samplewise_depthwise_conv2d: {name} must be an int or 2 ints, got {value!r}")
    return pair


def samplewise_depthwise_conv2d(
    input: Tensor,
    weights: Tensor,
    coefficients: Tensor,
    biases: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """A depthwise 2-D convolution (``groups = C``) whose weights are interpolated per sample.

    ``input`` is ``[B, C, H, W]``, ``weights`` ``[S, C, 1, KH, KW]`` (S depthwise ``nn.Conv2d`` weights),
    ``coefficients`` ``[B, S]`` and ``biases`` ``[S, C]`` or None; zero padding. Sample ``b`` gets
    ``F.conv2d(input[b], sum_s c[b, s] W_s, sum_s c[b, s] bias_s, stride, padding, dilation, groups=C)``, up to
    rounding. Returns a channels-last ``[B, C, OH, OW]`` tensor in ``input``'s dtype (float32, float16, bfloat16).

    Each sample's taps are mixed once into a small fp32 table (``B * (KH * KW + 1) * C`` entries, never a per-sample
    copy of anything larger), then every output sums its taps in fp32: on the CPU one vectorized pass over a
    channels-last input (other layouts and reduced precision are converted once), on CUDA one thread per output.
    Inference only: no backward.
    """
    _refuse_autograd("samplewise_depthwise_conv2d", input, weights, coefficients, biases)
    return _ops.samplewise_depthwise_conv2d(
        input,
        weights,
        biases,
        coefficients,
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )


@torch.library.register_fake("dawin_ext::samplewise_depthwise_conv2d")
def _samplewise_depthwise_conv2d_fake(input, weights, biases, coefficients, stride, padding, dilation) -> Tensor:
    torch._check(input.dim() == 4, lambda: "samplewise_depthwise_conv2d: input must be [B, C, H, W]")
    torch._check(
        weights.dim() == 5 and weights.shape[2] == 1 and weights.shape[1] == input.shape[1],
        lambda: "samplewise_depthwise_conv2d: weights must be [S sources, C, 1, KH, KW]",
    )
    _fake_check_devices("samplewise_depthwise_conv2d", input, weights=weights, coefficients=coefficients, biases=biases)
    size = [
        (input.shape[2 + i] + 2 * padding[i] - dilation[i] * (weights.shape[3 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    ]
    return torch.empty(
        (input.shape[0], input.shape[1], *size),
        dtype=input.dtype,
        device=input.device,
        memory_format=torch.channels_last,
    )


# --------------------------------------------------------------------------------------------
# samplewise_lora
# --------------------------------------------------------------------------------------------
def samplewise_lora(
    input: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    coefficients: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """A linear layer with S LoRA adapters mixed per sample, without a merged weight.

    ``input`` is ``[B, ..., IN]``, ``lora_a`` ``[S, R, IN]``, ``lora_b`` ``[S, OUT, R]``, ``coefficients``
    ``[B, S]`` (each adapter's scale already folded in: ``c[b, s] * lora_alpha_s / r``), ``weight`` ``[OUT, IN]``
    and ``bias`` ``[OUT]`` the base layer (either may be None). Returns ``[B, ..., OUT]`` with
    ``out[b] = input[b] @ weight^T + bias + sum_s c[b, s] * (input[b] @ A_s^T) @ B_s^T``, which is the base layer
    with the weight ``W + sum_s c[b, s] B_s A_s`` merged for sample ``b``, up to rounding.

    It runs as shrink (one GEMM against all S adapters' A), a per-sample scaling of each sample's rank blocks, and
    expand (one GEMM against all B): the cost over the base GEMM is ``2 S R (IN + OUT) / (IN OUT)`` of it. Keep
    ``lora_b`` in the layout :func:`samplewise_lora_factors` builds to avoid a copy per call. On the CPU in float32
    with at least 6 rows per sample, a ``weight`` stored as ``[IN, OUT]`` (``W.t().contiguous().t()``) runs the base
    GEMM through :func:`samplewise_linear`'s brgemm path; a plain ``[OUT, IN]`` weight goes through ``at::mm``.
    Inference only.
    """
    _refuse_autograd("samplewise_lora", input, lora_a, lora_b, coefficients, weight, bias)
    return _ops.samplewise_lora(input, lora_a, lora_b, coefficients, weight, bias)


def samplewise_lora_factors(lora_a: Sequence[Tensor], lora_b: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stacks S adapters' ``A_s [R, IN]`` and ``B_s [OUT, R]`` into ``([S, R, IN], [S, OUT, R])``.

    ``lora_b`` is stored as ``[S, R, OUT]`` (each ``B_s`` transposed) and returned as its ``transpose(1, 2)``
    view, the layout :func:`samplewise_lora`'s expand GEMM reads without a copy. All adapters need one rank;
    pad a lower-rank adapter with zero rows of A and zero columns of B (exact: they add nothing).
    """
    if len(lora_a) == 0 or len(lora_a) != len(lora_b):
        raise ValueError(f"samplewise_lora_factors: need S >= 1 A and B factors, got {len(lora_a)} and {len(lora_b)}")
    a_shapes = {tuple(a.shape) for a in lora_a}
    b_shapes = {tuple(b.shape) for b in lora_b}
    if len(a_shapes) != 1 or len(b_shapes) != 1 or len(next(iter(a_shapes))) != 2 or len(next(iter(b_shapes))) != 2:
        raise ValueError(
            f"samplewise_lora_factors: need S A factors of one [R, IN] shape and S B factors of one [OUT, R] "
            f"shape, got {sorted(a_shapes)} and {sorted(b_shapes)}"
        )
    a = torch.stack([t.detach() for t in lora_a], 0).contiguous()
    b = torch.stack([t.detach().t() for t in lora_b], 0).contiguous().transpose(1, 2)
    if a.shape[1] != b.shape[2]:
        raise ValueError(f"samplewise_lora_factors: A has rank {a.shape[1]} but B has rank {b.shape[2]}")
    return a, b


# A fake kernel takes the op's schema, hence the same signature as samplewise_lora above.
@torch.library.register_fake("dawin_ext::samplewise_lora")
def _samplewise_lora_fake(
    input: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    coefficients: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    torch._check(input.dim() >= 2, lambda: "samplewise_lora: input must be [B, ..., IN]")
    torch._check(lora_a.dim() == 3, lambda: "samplewise_lora: lora_a must be [S, R, IN]")
    torch._check(lora_b.dim() == 3, lambda: "samplewise_lora: lora_b must be [S, OUT, R]")
    _fake_check_devices(
        "samplewise_lora", input, lora_a=lora_a, lora_b=lora_b, coefficients=coefficients, weight=weight, bias=bias
    )
    return input.new_empty((*input.shape[:-1], lora_b.shape[1]))
