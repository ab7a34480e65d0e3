"""Plain-PyTorch mirrors of the public reference code (naver-ai/dawin, mlfoundations/wise-ft).

Tests and benchmarks compare the compiled ops against these. They are written for clarity, not
speed, and follow the reference formulas line by line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def entropy_reference(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``-(softmax(z) * log_softmax(z)).sum(-1)`` with ``z = logits / T`` (the reference's entropy)."""
    z = logits / temperature
    return -(F.softmax(z, dim=-1) * F.log_softmax(z, dim=-1)).sum(-1)


def offset_ratio_reference(score_zs: Tensor, score_ft: Tensor, offset_adjustment: bool) -> Tensor:
    """``(e^-s_ft + b/w) / (e^-s_zs + e^-s_ft + b)`` per sample (b = 0, w = 2 without offset), as main_dawin.py has it.

    Deliberately a copy of the formula that the package keeps in csrc/coefficients_from_entropies.cpp and in
    dawin_ext/methods/dawin.py (_offset_stats, _ratio): a mirror must not share code with what it checks.
    """
    if offset_adjustment:
        b = (score_zs.std() / score_zs.mean() + score_ft.std() / score_ft.mean()) / 2
        w = (score_zs.mean() + score_ft.mean()) / score_zs.mean()
    else:
        b, w = 0.0, 2.0
    e_zs, e_ft = (-score_zs).exp(), (-score_ft).exp()
    return (e_ft + b / w) / (e_zs + e_ft + b)


def coefficient_reference(
    zs_logits: Tensor,
    ft_logits: Tensor,
    temperatures: tuple[float, float] = (1.0, 1.0),
    offset_adjustment: bool = False,
) -> Tensor:
    """DaWin's lambda per sample: ``(e^-H_ft + b/w) / (e^-H_zs + e^-H_ft + b)`` (b = 0, w = 2 without offset)."""
    h_zs = entropy_reference(zs_logits, temperatures[0])
    h_ft = entropy_reference(ft_logits, temperatures[1])
    return offset_ratio_reference(h_zs, h_ft, offset_adjustment)


def interpolation_reference(alpha, weight1: Mapping[str, Tensor], weight2: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The reference dict comprehension: ``(1 - alpha) * w1 + alpha * w2`` for every key of ``w1``."""
    return {key: (1 - alpha) * weight1[key] + alpha * weight2[key] for key in weight1.keys()}  # noqa: SIM118  (mirrors the reference)


def blend_reference(sources: Sequence[Mapping[str, Tensor]], coefficients) -> list[dict[str, Tensor]]:
    """K weighted blends by dict comprehension (floating keys blended, others copied from source 0)."""
    coef = torch.as_tensor(coefficients, dtype=torch.float64)
    if coef.dim() == 1:
        coef = coef.unsqueeze(0)
    out = []
    for row in coef.tolist():
        merged = {}
        for key, ref in sources[0].items():
            if ref.is_floating_point():
                merged[key] = sum(c * sd[key] for c, sd in zip(row, sources, strict=True))
            else:
                merged[key] = ref.clone()
        out.append(merged)
    return out


def samplewise_linear_reference(
    input: Tensor, weights: Tensor, coefficients: Tensor, biases: Tensor | None = None
) -> Tensor:
    """Merge the weights for each sample, then ``F.linear`` that sample alone (the per-sample loop)."""
    outs = []
    for b in range(input.shape[0]):
        c = coefficients[b].to(weights.dtype)
        w = sum(c[g] * weights[g] for g in range(weights.shape[0]))
        bias = None if biases is None else sum(c[g] * biases[g] for g in range(biases.shape[0]))
        outs.append(torch.nn.functional.linear(input[b], w, bias))
    return torch.stack(outs) if outs else input.new_empty((*input.shape[:-1], weights.shape[1]))


def sample_combine_reference(stacked: Tensor, weights: Tensor) -> Tensor:
    """``out[b, m, n] = sum_s weights[b, s] * stacked[b, m, s, n]``."""
    return torch.einsum("bmsn,bs->bmn", stacked, weights.to(stacked.dtype))


def samplewise_depthwise_conv2d_reference(
    input: Tensor,
    weights: Tensor,
    coefficients: Tensor,
    biases: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
) -> Tensor:
    """Merge the ``[S, C, 1, KH, KW]`` weights for each sample, then ``F.conv2d(groups=C)`` that sample alone."""
    outs = []
    for b in range(input.shape[0]):
        c = coefficients[b].to(weights.dtype)
        w = sum(c[s] * weights[s] for s in range(weights.shape[0]))
        bias = None if biases is None else sum(c[s] * biases[s] for s in range(biases.shape[0]))
        outs.append(F.conv2d(input[b : b + 1], w, bias, stride, padding, dilation, input.shape[1]))
    return torch.cat(outs)
