"""DaWin for model merging: theta_0 plus T task vectors, with per-sample task weights from entropies.

Each task model theta_0 + tau_t scores the sample with the evaluation dataset's head; the task weights are

    pi(x) = softmax_t(-H_t(x))          (no temperature; computed by the fused entropy_coefficients op)

and the merged model is ``theta_0 + sum_t c * pi_t(x) * tau_t`` with ``c = scale * T`` (0.3 * T in the
reference, so uniform pi gives task arithmetic with scale 0.3). The pi vectors of a dataset are
clustered with a :class:`DirichletMixture`; every cluster's model (coefficient row ``[1, c * params_k]``)
is built once with ``blend`` from the sources ``[theta_0, tau_1, ..., tau_T]`` into reusable buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..exact import SampleWiseInterpolator
from ..ops import entropy_coefficients
from ..ops.statedict import StateDict, as_state_dict, check_compatible, check_finite_state_dict
from .blended import BlendedModels
from .inference import (
    check_logits_finite,
    check_mode,
    collect_logits,
    predict_in_fit_order,
    route,
)
from .mixture import DirichletMixture

__all__ = ["DaWinMultiTask", "task_vectors_from"]

_MAX_TASKS = 15  # blend takes at most 16 sources: theta_0 plus 15 task vectors


def task_vectors_from(theta_0: Mapping[str, Tensor], task_thetas: Sequence[Mapping[str, Tensor]]) -> list[StateDict]:
    """tau_t = theta_t - theta_0 for every floating key (other keys: zeros, never blended)."""
    names = ["theta_0", *[f"task {t}" for t in range(len(task_thetas))]]
    check_compatible([theta_0, *task_thetas], names=names)
    out = []
    with torch.no_grad():
        for th in task_thetas:
            out.append({k: (th[k] - v) if v.is_floating_point() else torch.zeros_like(v) for k, v in theta_0.items()})
    return out


class _WithHead(nn.Module):
    def __init__(self, body: Callable[[Tensor], Tensor], head: Callable[[Tensor], Tensor] | None) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: Tensor) -> Tensor:
        z = self.body(x)
        return z if self.head is None else self.head(z)


class DaWinMultiTask:
    """Sample-adaptive task-vector merging (DaWin multi-task).

    Args:
        model: the shared architecture (an encoder if ``head`` is given, else a classifier); not modified.
        theta_0: pre-trained state dict (or module).
        task_thetas: T fine-tuned state dicts; or give ``task_vectors`` (tau_t) instead.
        head: optional module mapping ``model``'s output to logits (the evaluation dataset's head; it is
            not merged). Change it with :meth:`set_head` between datasets, then :meth:`fit` again.
        scale: per-task scale; the merge coefficient is ``scale * T * pi_t`` if ``scale_by_tasks`` else
            ``scale * pi_t``.
        n_clusters: Dirichlet-mixture components (1 = one merge per dataset, the reference's default).
        seed: k-means seed of the mixture.
    """

    def __init__(
        self,
        model: nn.Module,
        theta_0: Mapping[str, Tensor] | nn.Module,
        task_thetas: Sequence[Mapping[str, Tensor] | nn.Module] | None = None,
        *,
        task_vectors: Sequence[Mapping[str, Tensor]] | None = None,
        head: Callable[[Tensor], Tensor] | None = None,
        scale: float = 0.3,
        scale_by_tasks: bool = True,
        n_clusters: int = 1,
        seed: int = 0,
    ) -> None:
        if (task_thetas is None) == (task_vectors is None):
            raise ValueError("DaWinMultiTask: give exactly one of task_thetas and task_vectors")
        if int(n_clusters) < 1:
            raise ValueError(f"DaWinMultiTask: n_clusters must be >= 1, got {n_clusters}")
        self.theta_0 = as_state_dict(theta_0, "theta_0")
        if task_thetas is not None:
            thetas = [as_state_dict(t, f"task_thetas[{i}]") for i, t in enumerate(task_thetas)]
            taus = task_vectors_from(self.theta_0, thetas)
        else:
            taus = [as_state_dict(t, f"task_vectors[{i}]") for i, t in enumerate(task_vectors)]
        n_tasks = len(taus)
        if not 1 <= n_tasks <= _MAX_TASKS:
            raise ValueError(f"DaWinMultiTask: need 1 to {_MAX_TASKS} tasks, got {n_tasks}")
        self.task_vectors = taus
        self.sources = [self.theta_0, *taus]
        # Keys, shapes, dtypes and devices first: they need no tensor values, while the finiteness check
        # reads every element (and would fail on, or copy from, a tensor on the wrong device).
        check_compatible(
            [as_state_dict(model, "model"), *self.sources],
            names=["model", "theta_0", *[f"task vector {t}" for t in range(n_tasks)]],
        )
        check_finite_state_dict(self.theta_0, "DaWinMultiTask: theta_0")
        for t, tau in enumerate(taus):
            check_finite_state_dict(tau, f"DaWinMultiTask: task vector {t}")
        self.n_tasks = n_tasks
        self.scale = float(scale)
        self.scale_by_tasks = bool(scale_by_tasks)
        self.n_clusters = int(n_clusters)
        self.seed = int(seed)
        self.model = model
        self.head = head
        self.device = next(iter(self.theta_0.values())).device
        # Task models theta_0 + tau_t, built once.
        self.task_models = BlendedModels(model, self.sources, n_models=n_tasks)
        self.task_models.blend(torch.cat([torch.ones(n_tasks, 1), torch.eye(n_tasks)], dim=1))
        self.clusters: BlendedModels | None = None
        self._exact = None

    @property
    def multiplier(self) -> float:
        """c in theta_0 + sum_t c * pi_t * tau_t."""
        return self.scale * self.n_tasks if self.scale_by_tasks else self.scale

    def set_head(self, head: Callable[[Tensor], Tensor] | None) -> None:
        """Switches the evaluation head (call :meth:`fit` again for the new dataset)."""
        self.head = head

    def coefficient_rows(self, pi: Tensor) -> Tensor:
        """Blend rows [N, 1 + T] = [1, c * pi_1, ..., c * pi_T] for task weights ``pi`` [N, T]."""
        pi = torch.as_tensor(pi, dtype=torch.float64)
        ones = torch.ones(pi.shape[0], 1, dtype=torch.float64, device=pi.device)
        return torch.cat([ones, self.multiplier * pi], dim=1)

    def _task_heads(self) -> list[_WithHead]:
        return [_WithHead(m, self.head) for m in self.task_models.models]

    @staticmethod
    def _pi(task_logits: Sequence[Tensor]) -> Tensor:
        shapes = {tuple(z.shape) for z in task_logits}
        if len(shapes) != 1:
            raise ValueError(f"DaWinMultiTask: task models' logits have different shapes {sorted(shapes)}")
        for t, z in enumerate(task_logits):
            check_logits_finite(z, f"task model {t}")
        # entropy_coefficients' normalized exp(-H) over the T models is softmax_t(-H_t).
        return entropy_coefficients(torch.stack([z.float() for z in task_logits])).coefficients

    @torch.no_grad()
    def fit(self, loader: Iterable, progress: bool = False, group=None) -> DaWinMultiTask:
        """Scores ``loader`` with every task model once, computes pi, fits the Dirichlet mixture and builds
        the cluster models. Sets ``pi_`` [N, T], ``labels_`` [N], ``cluster_pi_`` [K, T], ``mixture_``.

        In an initialised process group (or with ``group=``; ``group=False`` opts out) each rank scores its
        own shard; the task entropies are gathered in rank order and pi, the mixture and the assignments are
        computed once for the whole set (identical on every rank); ``shard_`` is the rank's ``[start, stop)``.
        """
        from . import distributed

        pg = distributed.active_group(group)
        if pg is not None:
            return distributed.fit_multitask(self, loader, pg, progress)
        names = [f"task model {t}" for t in range(self.n_tasks)]
        logits, _ = collect_logits(self._task_heads(), loader, names=names, device=self.device, progress=progress)
        self.pi_ = self._pi(logits)
        self.n_samples_ = self.pi_.shape[0]
        self.mixture_ = DirichletMixture(n_components=self.n_clusters, seed=self.seed).fit(self.pi_.double().numpy())
        self.labels_ = torch.from_numpy(self.mixture_.predict(self.pi_.double().numpy()))
        self.cluster_pi_ = torch.from_numpy(self.mixture_.params_.copy())
        if self.clusters is None:
            self.clusters = BlendedModels(self.model, self.sources, n_models=self.n_clusters)
        self.clusters.blend(self.coefficient_rows(self.cluster_pi_))
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "pi_"):
            raise RuntimeError("DaWinMultiTask: call fit(loader) first")

    @torch.no_grad()
    def coefficients(self, x: Tensor) -> Tensor:
        """Task weights pi [B, T] of a batch."""
        x = x.to(self.device)
        return self._pi([m(x) for m in self._task_heads()])

    @torch.no_grad()
    def predict(self, x: Tensor, mode: str = "cluster") -> Tensor:
        """Streaming inference: logits [B, C]. ``cluster`` assigns pi to the fitted clusters (no refit) and
        routes; ``exact`` merges per sample through SampleWiseInterpolator."""
        self._check_fitted()
        check_mode(mode, "DaWinMultiTask")
        x = x.to(self.device)
        pi = self.coefficients(x)
        if mode == "exact":
            return self._exact_forward(x, pi)
        assignment = torch.from_numpy(self.mixture_.predict(pi.detach().double().cpu().numpy()))
        return route([_WithHead(m, self.head) for m in self.clusters.models], x, assignment)

    @torch.no_grad()
    def predict_dataset(self, loader: Iterable, mode: str = "cluster", group=None) -> Tensor:
        """Offline inference over the ``fit`` data in the same order, reusing the stored pi and clusters
        (after a distributed ``fit``: the rank's shard, locally)."""
        from . import distributed

        self._check_fitted()
        s0, s1 = distributed.fitted_shard(self, group, "DaWinMultiTask.predict_dataset")
        check_mode(mode, "DaWinMultiTask")
        models = [_WithHead(m, self.head) for m in self.clusters.models]

        def forward(x: Tensor, start: int, stop: int) -> Tensor:
            if mode == "exact":
                return self._exact_forward(x, self.pi_[s0 + start : s0 + stop])
            return route(models, x, self.labels_[s0 + start : s0 + stop])

        if s1 == s0:  # a rank with an empty shard
            return torch.empty(0, self.n_outputs_)
        return predict_in_fit_order(loader, s1 - s0, self.device, "DaWinMultiTask", forward)

    def _exact_forward(self, x: Tensor, pi: Tensor) -> Tensor:
        if self._exact is None:
            # The interpolator takes full parameter sets with rows summing to 1: [theta_0, theta_0 + tau_t]
            # (the task models' buffers) with rows [1 - c * sum(pi), c * pi] give theta_0 + sum_t c pi_t tau_t.
            self._exact = SampleWiseInterpolator(self.model, [self.theta_0, *self.task_models.buffers])
        scales = self.multiplier * pi.to(torch.float64)
        rows = torch.cat([1.0 - scales.sum(dim=1, keepdim=True), scales], dim=1)
        feats = self._exact(x, rows.float().to(x.device))
        return feats if self.head is None else self.head(feats)

    def cluster_sizes(self) -> np.ndarray:
        """How many fit samples each cluster holds."""
        self._check_fitted()
        return np.bincount(self.labels_.numpy(), minlength=self.n_clusters)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Writes what ``fit`` produced (settings, pi, cluster assignments, the Dirichlet mixture) to directory
        ``path`` with content hashes of theta_0, every task vector and the head (if it is a module). See
        :mod:`dawin_ext.methods.persistence`."""
        from .persistence import save_multitask

        return save_multitask(self, path)

    @classmethod
    def load(
        cls,
        path,
        model: nn.Module,
        theta_0: Mapping[str, Tensor] | nn.Module,
        task_thetas: Sequence[Mapping[str, Tensor] | nn.Module] | None = None,
        *,
        task_vectors: Sequence[Mapping[str, Tensor]] | None = None,
        head: Callable[[Tensor], Tensor] | None = None,
    ) -> DaWinMultiTask:
        """Rebuilds a fitted DaWinMultiTask from :meth:`save`'s directory and the same weights and head.

        Refuses (:class:`~dawin_ext.methods.persistence.WeightMismatchError`, naming the keys) weights or a head module
        that differ from the fitted ones; :class:`~dawin_ext.methods.persistence.SavedStateError` for unreadable files."""
        from .persistence import load_multitask

        return load_multitask(cls, path, model, theta_0, task_thetas, task_vectors=task_vectors, head=head)
