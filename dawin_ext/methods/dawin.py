"""DaWin: training-free dynamic weight interpolation of a zero-shot and a fine-tuned model.

For each sample x, DaWin measures each model's expertise (by default the entropy of its prediction) and
interpolates ``theta(x) = (1 - lambda(x)) * theta_zs + lambda(x) * theta_ft`` with

    lambda(x) = (e^{-H_ft} + b / w) / (e^{-H_zs} + e^{-H_ft} + b)        (b = 0, w = 2 without offset)

To avoid one merge per sample, the lambdas of a dataset are clustered with a :class:`BetaMixture` (K = 3
in the paper) and each sample runs through its cluster's model, whose coefficient is the Beta mean.
Here the K models are built once with the fused ``blend`` kernel into reusable parameter buffers and each
batch is routed sample by sample to them; the public reference instead re-merges the full state dict for
every cluster present in every batch.

Two ways to run it:

* **offline** -- ``fit(loader)`` runs both models once over the dataset (keeping their logits), computes
  the lambdas, fits the mixture and builds the K models; ``predict_dataset(loader)`` then costs one forward
  pass per sample (the coefficients are reused by position).
* **streaming** -- ``fit`` on a calibration set, then ``predict(batch)`` per request: both models score the
  batch, its lambdas are assigned to the already fitted clusters (no refitting; offset statistics also
  come from the calibration set) and each sample runs through its cluster's model.

``mode="exact"`` computes every sample with its own interpolated weights through
``dawin_ext.exact.SampleWiseInterpolator``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..exact import SampleWiseInterpolator
from ..ops import entropy_coefficients
from ..ops.statedict import as_state_dict, check_compatible, check_finite_state_dict
from .blended import BlendedModels
from .inference import (
    check_logits_finite,
    check_mode,
    collect_logits,
    predict_in_fit_order,
    route,
)
from .mixture import BetaMixture

__all__ = ["DaWin", "EXPERTISE_METRICS", "PSEUDO_LABELS", "dawin_coefficients"]

#: Expertise metrics. "entropy", "cross_entropy" and "max_logit" give a lambda used for weight
#: interpolation; "selective" and "output_ensemble" work in output space (no merged weights).
EXPERTISE_METRICS = ("entropy", "cross_entropy", "max_logit", "selective", "output_ensemble")
#: Labels for the cross-entropy ratio: soft/hard from the output ensemble or from the alpha=0.5 merged
#: model, or "true" (the oracle, needs labels).
PSEUDO_LABELS = ("ensemble_soft", "merged_soft", "ensemble_hard", "merged_hard", "true")
_WEIGHT_SPACE = ("entropy", "cross_entropy", "max_logit")


def _check_temperatures(temperatures) -> tuple[float, float]:
    temps = tuple(float(t) for t in temperatures)
    if len(temps) != 2:
        raise ValueError(f"DaWin: need two temperatures (zero-shot, fine-tuned), got {temperatures!r}")
    for t in temps:
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"DaWin: temperatures must be finite and > 0, got {temps}")
    return temps


def _offset_stats(score_zs: Tensor, score_ft: Tensor) -> tuple[float, float]:
    """(b, w) of the offset adjustment from per-sample scores (entropies or losses) over a dataset.

    With :func:`_ratio`, the float64 form of the formula in csrc/coefficients_from_entropies.cpp, kept here because
    it serves what the fused op cannot: cross-entropy scores, and (b, w) stored at ``fit`` for streaming batches."""
    if score_zs.numel() < 2:
        raise ValueError("DaWin: the offset adjustment needs at least 2 samples")
    zs, ft = score_zs.double(), score_ft.double()
    b = 0.5 * (zs.std() / zs.mean() + ft.std() / ft.mean())
    w = (zs.mean() + ft.mean()) / zs.mean()
    return float(b), float(w)


def _ratio(score_zs: Tensor, score_ft: Tensor, offset: tuple[float, float] | None) -> Tensor:
    b, w = offset if offset is not None else (0.0, 2.0)
    e_zs, e_ft = (-score_zs.double()).exp(), (-score_ft.double()).exp()
    return ((e_ft + b / w) / (e_zs + e_ft + b)).float()


def _pseudo_labels(kind: str, zs: Tensor, ft: Tensor, merged: Tensor | None, labels: Tensor | None, temps):
    if kind == "true":
        if labels is None:
            raise ValueError("DaWin: pseudo_label='true' (oracle) needs labels from the loader or y=")
        labels = labels.to(zs.device).long()
        if labels.shape != zs.shape[:1]:
            raise ValueError(f"DaWin: got {tuple(labels.shape)} labels for {zs.shape[0]} samples")
        bad = (labels < 0) | (labels >= zs.shape[1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"DaWin: label of sample {i} is {int(labels[i])}, outside [0, {zs.shape[1]}) classes")
        return labels
    if kind.startswith("ensemble"):
        p = F.softmax(zs / temps[0], dim=1) + F.softmax(ft / temps[1], dim=1)
        return p / 2 if kind.endswith("soft") else p.argmax(dim=1)
    if merged is None:
        raise ValueError(f"DaWin: pseudo_label={kind!r} needs the merged model's logits")
    return F.softmax(merged, dim=1) if kind.endswith("soft") else merged.argmax(dim=1)


def _per_sample_ce(logits: Tensor, target: Tensor) -> Tensor:
    if target.dim() == 2:  # soft labels
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    return F.cross_entropy(logits, target, reduction="none")


def dawin_coefficients(
    zs_logits: Tensor,
    ft_logits: Tensor,
    *,
    expertise: str = "entropy",
    temperatures=(1.0, 1.0),
    offset: tuple[float, float] | None | bool = None,
    pseudo_label: str = "ensemble_soft",
    merged_logits: Tensor | None = None,
    labels: Tensor | None = None,
) -> tuple[Tensor, tuple[float, float] | None]:
    """Per-sample lambda (weight on the fine-tuned model) for one expertise metric; returns (lambda [N], offset).

    ``offset``: None or False = no offset adjustment; True = compute (b, w) from these samples; a (b, w)
    pair = use those statistics (streaming, from the calibration set). The returned offset is what was used.
    Entropies come from the fused ``entropy_coefficients`` kernel; the max-logit ratio must land in [0, 1]
    (it needs positive max logits), else the error names the sample.
    """
    if expertise not in EXPERTISE_METRICS:
        raise ValueError(f"DaWin: unknown expertise {expertise!r}; choose from {EXPERTISE_METRICS}")
    temps = _check_temperatures(temperatures)
    if zs_logits.shape != ft_logits.shape or zs_logits.dim() != 2:
        raise ValueError(
            f"DaWin: zero-shot and fine-tuned logits must both be [N, C]; got {tuple(zs_logits.shape)} "
            f"and {tuple(ft_logits.shape)} (do the models have the same number of classes?)"
        )
    if zs_logits.shape[0] == 0:
        raise ValueError("DaWin: no samples")
    check_logits_finite(zs_logits, "zero-shot model")
    check_logits_finite(ft_logits, "fine-tuned model")
    if offset is True and zs_logits.shape[0] < 2:
        raise ValueError(
            f"DaWin: the offset adjustment needs at least 2 samples (it uses entropy statistics), got {zs_logits.shape[0]}"
        )
    if offset is not None and offset is not True and offset is not False:
        b_w = tuple(float(v) for v in offset)
        if len(b_w) != 2 or not all(math.isfinite(v) for v in b_w) or b_w[1] == 0:
            raise ValueError(
                f"DaWin: offset must be True/False/None or a finite (b, w) pair with w != 0, got {offset!r}"
            )
    zs, ft = zs_logits.float(), ft_logits.float()
    if offset is not None and offset is not False and expertise not in ("entropy", "cross_entropy", "output_ensemble"):
        raise ValueError(f"DaWin: the offset adjustment is defined for entropy and cross-entropy, not {expertise!r}")
    used: tuple[float, float] | None = None
    if expertise in ("entropy", "output_ensemble", "selective"):
        res = entropy_coefficients(torch.stack([zs, ft]), temps, bool(offset is True))
        h_zs, h_ft = res.entropies[0], res.entropies[1]
        if expertise == "selective":
            return (h_zs > h_ft).float(), None
        if offset is True:
            used = _offset_stats(h_zs, h_ft)
            return res.coefficients[:, 1].contiguous(), used
        if offset is None or offset is False:
            return res.coefficients[:, 1].contiguous(), None
        used = (float(offset[0]), float(offset[1]))
        return _ratio(h_zs, h_ft, used), used
    if expertise == "cross_entropy":
        if pseudo_label not in PSEUDO_LABELS:
            raise ValueError(f"DaWin: unknown pseudo_label {pseudo_label!r}; choose from {PSEUDO_LABELS}")
        target = _pseudo_labels(pseudo_label, zs, ft, merged_logits, labels, temps)
        l_zs, l_ft = _per_sample_ce(zs, target), _per_sample_ce(ft, target)
        if offset is True:
            used = _offset_stats(l_zs, l_ft)
        elif offset is not None and offset is not False:
            used = (float(offset[0]), float(offset[1]))
        return _ratio(l_zs, l_ft, used), used
    # max-logit ratio, on raw logits as in the reference
    m_zs, m_ft = zs.max(dim=1).values.double(), ft.max(dim=1).values.double()
    lam = m_ft / (m_zs + m_ft)
    bad = torch.nonzero(~((lam >= 0) & (lam <= 1))).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"DaWin: max-logit ratio of sample {i} is {float(lam[i])} (max logits zs {float(m_zs[i])}, "
            f"ft {float(m_ft[i])}); it needs positive max logits, use another expertise metric"
        )
    return lam.float(), None


class DaWin:
    """Dynamic weight interpolation between a zero-shot and a fine-tuned model (see the module docstring).

    Args:
        model: the architecture; its outputs must be logits [B, C]. Its weights are not used or modified.
        theta_zs, theta_ft: zero-shot and fine-tuned state dicts (or modules) matching ``model``'s state
            dict exactly (keys, shapes, dtypes, device; the error names the first offending key).
        expertise: one of :data:`EXPERTISE_METRICS`.
        temperatures: per-model temperatures (zero-shot, fine-tuned) for entropies and probabilities.
        offset_adjustment: the reference's per-dataset offset; statistics come from the ``fit`` data.
        n_clusters: K, the number of Beta-mixture components (and of interpolated models).
        seed: seed of the mixture's k-means initialisation.
        pseudo_label: labels of the cross-entropy ratio, one of :data:`PSEUDO_LABELS`.
        merged_alpha: alpha of the merged model that ``merged_*`` pseudo labels come from.
    """

    def __init__(
        self,
        model: nn.Module,
        theta_zs: Mapping[str, Tensor] | nn.Module,
        theta_ft: Mapping[str, Tensor] | nn.Module,
        *,
        expertise: str = "entropy",
        temperatures: tuple[float, float] = (1.0, 1.0),
        offset_adjustment: bool = False,
        n_clusters: int = 3,
        seed: int = 1,
        pseudo_label: str = "ensemble_soft",
        merged_alpha: float = 0.5,
    ) -> None:
        if expertise not in EXPERTISE_METRICS:
            raise ValueError(f"DaWin: unknown expertise {expertise!r}; choose from {EXPERTISE_METRICS}")
        if pseudo_label not in PSEUDO_LABELS:
            raise ValueError(f"DaWin: unknown pseudo_label {pseudo_label!r}; choose from {PSEUDO_LABELS}")
        if offset_adjustment and expertise not in ("entropy", "cross_entropy", "output_ensemble"):
            raise ValueError(f"DaWin: offset_adjustment is defined for entropy and cross-entropy, not {expertise!r}")
        if int(n_clusters) < 1:
            raise ValueError(f"DaWin: n_clusters must be >= 1, got {n_clusters}")
        self.temperatures = _check_temperatures(temperatures)
        self.expertise = expertise
        self.offset_adjustment = bool(offset_adjustment)
        self.n_clusters = int(n_clusters)
        self.seed = int(seed)
        self.pseudo_label = pseudo_label
        self.merged_alpha = float(merged_alpha)
        self.model = model
        self.theta_zs = as_state_dict(theta_zs, "theta_zs")
        self.theta_ft = as_state_dict(theta_ft, "theta_ft")
        check_compatible(
            [as_state_dict(model, "model"), self.theta_zs, self.theta_ft], names=["model", "theta_zs", "theta_ft"]
        )
        check_finite_state_dict(self.theta_zs, "DaWin: theta_zs")
        check_finite_state_dict(self.theta_ft, "DaWin: theta_ft")
        self._needs_merged = expertise == "cross_entropy" and pseudo_label.startswith("merged")
        rows = [[1.0, 0.0], [0.0, 1.0]]
        if self._needs_merged:
            rows.append([1.0 - self.merged_alpha, self.merged_alpha])
        # The experts (zero-shot, fine-tuned, optional merged) are built once.
        self.experts = BlendedModels(model, [self.theta_zs, self.theta_ft], n_models=len(rows))
        self.experts.blend(rows)
        self.clusters: BlendedModels | None = None
        self._exact = None
        self.device = next(iter(self.theta_zs.values())).device

    # ------------------------------------------------------------------ helpers
    @property
    def weight_space(self) -> bool:
        """Whether this expertise interpolates weights (else it combines outputs)."""
        return self.expertise in _WEIGHT_SPACE

    def _expert_logits(self, x: Tensor) -> list[Tensor]:
        return [m(x) for m in self.experts.models]

    def _coefficients(self, logits: list[Tensor], labels: Tensor | None, offset) -> tuple[Tensor, object]:
        merged = logits[2] if self._needs_merged else None
        return dawin_coefficients(
            logits[0],
            logits[1],
            expertise=self.expertise,
            temperatures=self.temperatures,
            offset=offset,
            pseudo_label=self.pseudo_label,
            merged_logits=merged,
            labels=labels,
        )

    def _output_space(self, zs: Tensor, ft: Tensor, lam: Tensor) -> Tensor:
        if self.expertise == "selective":
            return torch.where(lam.to(zs.device).bool().unsqueeze(1), ft, zs)
        p_zs = F.softmax(zs.float() / self.temperatures[0], dim=1)
        p_ft = F.softmax(ft.float() / self.temperatures[1], dim=1)
        w = lam.to(p_zs.device).unsqueeze(1)
        return (1 - w) * p_zs + w * p_ft

    def _check_fitted(self) -> None:
        if not hasattr(self, "coefficients_"):
            raise RuntimeError("DaWin: call fit(loader) first")

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def fit(self, loader: Iterable, progress: bool = False, group=None) -> DaWin:
        """Runs both models once over ``loader`` ((x, y) or x batches), computes lambda, fits the mixture
        and builds the K cluster models. Sets ``coefficients_`` [N], ``labels_`` [N] (cluster per sample),
        ``cluster_coefficients_`` [K], ``mixture_``, ``offset_``, ``logits_`` (zero-shot, fine-tuned).

        In an initialised process group (or with ``group=``; ``group=False`` opts out) each rank's ``loader``
        yields its own shard (e.g. :class:`dawin_ext.methods.distributed.ShardSampler`) and the fit is global: the
        mixture is fitted once on all ranks' lambdas, in rank order, and ``coefficients_``, ``labels_``,
        ``cluster_coefficients_``, ``mixture_``, ``offset_`` and ``n_samples_`` are those of the whole set,
        identical on every rank; ``logits_`` and ``fit_labels_`` are the rank's shard, ``shard_`` its
        ``[start, stop)`` in the global order (see :mod:`dawin_ext.methods.distributed`).
        """
        from . import distributed

        pg = distributed.active_group(group)
        if pg is not None:
            return distributed.fit_dawin(self, loader, pg, progress)
        names = ["zero-shot model", "fine-tuned model", "merged model"][: len(self.experts)]
        logits, labels = collect_logits(self.experts.models, loader, names=names, device=self.device, progress=progress)
        lam, self.offset_ = self._coefficients(logits, labels, True if self.offset_adjustment else None)
        self.coefficients_ = lam
        self.logits_ = (logits[0], logits[1])
        self.fit_labels_ = labels
        self.n_samples_ = lam.shape[0]
        if self.weight_space:
            self.mixture_ = BetaMixture(n_components=self.n_clusters, seed=self.seed).fit(lam.numpy())
            self.labels_ = torch.from_numpy(self.mixture_.predict(lam.numpy()))
            self.cluster_coefficients_ = torch.from_numpy(self.mixture_.means_.copy())
            if self.clusters is None:
                self.clusters = BlendedModels(self.model, [self.theta_zs, self.theta_ft], n_models=self.n_clusters)
            m = self.cluster_coefficients_
            self.clusters.blend(torch.stack([1.0 - m, m], dim=1))
        return self

    @torch.no_grad()
    def coefficients(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Lambda [B] of a new batch, with offset statistics from ``fit`` (no refitting)."""
        self._check_fitted()
        logits = self._expert_logits(x.to(self.device))
        return self._coefficients(logits, y, self.offset_)[0]

    @torch.no_grad()
    def assign(self, coefficients: Tensor) -> Tensor:
        """Cluster index [B] of each lambda under the fitted mixture."""
        self._check_fitted()
        if not self.weight_space:
            raise RuntimeError(f"DaWin: expertise {self.expertise!r} does not cluster")
        return torch.from_numpy(self.mixture_.predict(torch.as_tensor(coefficients).detach().double().cpu().numpy()))

    @torch.no_grad()
    def predict(self, x: Tensor, mode: str = "cluster", y: Tensor | None = None) -> Tensor:
        """Streaming inference on one batch: scores [B, C] whose argmax is the prediction.

        Weight-space expertise returns logits; ``mode="cluster"`` routes each sample to its cluster's model,
        ``mode="exact"`` uses per-sample weights. "selective" returns the chosen model's logits and
        "output_ensemble" returns mixed probabilities. ``y`` is needed only for ``pseudo_label="true"``.
        """
        self._check_fitted()
        check_mode(mode, "DaWin")
        x = x.to(self.device)
        logits = self._expert_logits(x)
        lam, _ = self._coefficients(logits, y, self.offset_)
        if not self.weight_space:
            return self._output_space(logits[0], logits[1], lam)
        if mode == "exact":
            return self._exact_forward(x, lam)
        return route(self.clusters.models, x, self.assign(lam))

    @torch.no_grad()
    def predict_dataset(self, loader: Iterable, mode: str = "cluster", progress: bool = False, group=None) -> Tensor:
        """Offline inference over the ``fit`` data (same order): reuses the stored coefficients, so weight-space
        modes cost one forward pass per sample and output-space modes none. Returns scores [N, C].

        After a distributed ``fit``, each rank's ``loader`` yields the same shard as in ``fit`` and the scores
        are that shard's (no communication: routing and the exact mode are local)."""
        from . import distributed

        self._check_fitted()
        check_mode(mode, "DaWin")
        s0, s1 = distributed.fitted_shard(self, group, "DaWin.predict_dataset")
        if not self.weight_space:
            return self._output_space(self.logits_[0], self.logits_[1], self.coefficients_[s0:s1])
        iterator = loader
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(loader, desc="DaWin", leave=False)

        def forward(x: Tensor, start: int, stop: int) -> Tensor:
            if mode == "exact":
                return self._exact_forward(x, self.coefficients_[s0 + start : s0 + stop])
            return route(self.clusters.models, x, self.labels_[s0 + start : s0 + stop])

        if s1 == s0:  # a rank with an empty shard
            return self.logits_[0].new_empty((0, self.logits_[0].shape[1]))
        return predict_in_fit_order(iterator, s1 - s0, self.device, "DaWin.predict_dataset", forward)

    def _exact_forward(self, x: Tensor, lam: Tensor) -> Tensor:
        if self._exact is None:
            self._exact = SampleWiseInterpolator(self.model, [self.theta_zs, self.theta_ft])
        lam = lam.to(torch.float32)
        coef = torch.stack([1.0 - lam, lam], dim=1).to(x.device)
        return self._exact(x, coef)

    def cluster_sizes(self) -> np.ndarray:
        """How many fit samples each cluster holds."""
        self._check_fitted()
        if not self.weight_space:
            raise RuntimeError(f"DaWin: expertise {self.expertise!r} does not cluster")
        return np.bincount(self.labels_.numpy(), minlength=self.n_clusters)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Writes everything ``fit`` produced (settings, temperatures, offset statistics, the mixture, cluster
        coefficients, per-sample coefficients and logits) to directory ``path``: ``tensors.safetensors`` plus
        ``meta.json`` with a format version and content hashes of ``theta_zs`` and ``theta_ft`` (not the weights
        themselves). See :mod:`dawin_ext.methods.persistence`."""
        from .persistence import save_dawin

        return save_dawin(self, path)

    @classmethod
    def load(
        cls,
        path,
        model: nn.Module,
        theta_zs: Mapping[str, Tensor] | nn.Module,
        theta_ft: Mapping[str, Tensor] | nn.Module,
    ) -> DaWin:
        """Rebuilds a fitted DaWin from :meth:`save`'s directory and the same weights, without refitting.

        Raises :class:`~dawin_ext.methods.persistence.WeightMismatchError` naming the differing keys when ``theta_zs`` or
        ``theta_ft`` is not bit-identical to the fitted weights (checked by content hash before anything is
        built), and :class:`~dawin_ext.methods.persistence.SavedStateError` for missing, truncated or corrupted files
        and for another format version."""
        from .persistence import load_dawin

        return load_dawin(cls, path, model, theta_zs, theta_ft)
