"""WiSE-FT, DaWin and multi-task DaWin as `fusion_bench <https://github.com/tanganke/fusion_bench>`_ algorithms.

Install with ``pip install 'dawin-ext[fusion_bench]'``. The Hydra configs ship in this package
(``dawin_ext/integrations/fusion_bench_config``); add them to fusion_bench's search path and pick a method::

    fusion_bench 'hydra.searchpath=[pkg://dawin_ext.integrations.fusion_bench_config]' \\
        method=dawin/wise_ft modelpool=CLIPVisionModelPool/clip-vit-base-patch32_robustness_clean ...

Methods (``method=``):

- ``dawin/wise_ft`` (:class:`WiSEFTAlgorithm`): ``(1 - alpha) * theta_pretrained + alpha * theta_finetuned`` with
  :func:`dawin_ext.wise_ft`; returns a model of the pool's class (a ``CLIPVisionModel`` for CLIP pools). Any pool
  with ``_pretrained_`` and one fine-tuned model.
- ``dawin/dawin`` (:class:`DaWinAlgorithm`): DaWin between ``_pretrained_`` and one fine-tuned model of a
  ``CLIPVisionModelPool``.
- ``dawin/dawin_multitask`` (:class:`DaWinMultiTaskAlgorithm`): multi-task DaWin over ``_pretrained_`` and every
  fine-tuned model of a ``CLIPVisionModelPool`` (task vectors ``theta_t - theta_pretrained``).

What the two DaWin methods do with data. DaWin's coefficients come from the entropies of the models' predictions
on each test sample, so the methods need the test images and each task's zero-shot head:

- For every test dataset of the **model pool** (``modelpool.test_datasets``; ``tasks`` selects a subset), the
  method reads the images (labels are never read), builds that task's zero-shot head from the pool's pretrained
  ``CLIPModel`` text tower and processor (class names and templates from fusion_bench's registry, or from the
  method's ``classnames`` / ``templates``), and fits DaWin on that set alone (the reference's offline setting: one
  mixture per evaluation set) with dawin-ext's kernels (:class:`dawin_ext.DaWin`, :class:`dawin_ext.DaWinMultiTask`).
- It returns a :class:`DaWinCLIPVisionModel`: a drop-in for the merged vision model. Called on a batch of pixel
  values it computes each sample's coefficients with the current task's head and returns the image tower's output
  under that sample's merged weights (``mode: cluster``: its Beta/Dirichlet-mixture cluster's model;
  ``mode: exact``: its own weights, dawin-ext's exact per-sample engine). The current task is chosen with
  :meth:`DaWinCLIPVisionModel.set_task`; the task pool :class:`DaWinCLIPVisionModelTaskPool` (``taskpool:
  dawin/clip_vision``, a ``CLIPVisionModelTaskPool`` that calls ``set_task`` before each task) does it for you.
  With one fitted task no selection is needed; with several, a forward pass without one raises.
- ``merged_model_save_path`` saves it with :meth:`DaWinCLIPVisionModel.save_pretrained`: each task's fitted state
  (:meth:`dawin_ext.DaWin.save`), reloadable with the same weights.

Class names given in ``classnames`` are also registered (with the templates used) in fusion_bench's
``CLIPTemplateFactory``, so that its task pool, later in the same run, evaluates those tasks with the same names and
templates.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.dawin import DaWin
from ..methods.inference import check_mode
from ..methods.multitask import DaWinMultiTask
from ..methods.wise_ft import wise_ft
from ..ops.statedict import check_keys_and_shapes
from . import hf_clip
from .openclip import get_templates

_EXTRA = "pip install 'dawin-ext[fusion_bench]'"


def _import_fusion_bench():
    try:
        from fusion_bench.method.base_algorithm import BaseAlgorithm
        from fusion_bench.modelpool import BaseModelPool
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "fusion_bench":
            raise ImportError(
                "dawin_ext.integrations.fusion_bench needs the 'fusion_bench' package, which is not installed; "
                f"install the extra: {_EXTRA}"
            ) from e
        raise
    return BaseAlgorithm, BaseModelPool


BaseAlgorithm, BaseModelPool = _import_fusion_bench()

__all__ = [
    "CONFIG_DIR",
    "SEARCHPATH",
    "DaWinAlgorithm",
    "DaWinCLIPVisionModel",
    "DaWinMultiTaskAlgorithm",
    "WiSEFTAlgorithm",
]

log = logging.getLogger(__name__)

#: The directory of this package's Hydra configs (``method/dawin/*.yaml``, ``taskpool/dawin/*.yaml``).
CONFIG_DIR = Path(__file__).with_name("fusion_bench_config")
#: What to add to fusion_bench's Hydra search path: ``'hydra.searchpath=[pkg://dawin_ext.integrations.fusion_bench_config]'``.
SEARCHPATH = "pkg://dawin_ext.integrations.fusion_bench_config"

_PRETRAINED = "_pretrained_"


def _plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes) as plain Python values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _tower(model: nn.Module) -> nn.Module:
    """The vision transformer of a ``CLIPVisionModel`` (transformers 4 wraps it in ``.vision_model``)."""
    return getattr(model, "vision_model", model)


def _finetuned_names(modelpool: BaseModelPool, want: str | None, what: str) -> str:
    names = list(modelpool.model_names)
    if not modelpool.has_pretrained:
        raise ValueError(f"{what}: the model pool has no '{_PRETRAINED}' model (the zero-shot / pre-trained one)")
    if want is not None:
        if want not in names:
            raise ValueError(f"{what}: finetuned={want!r} is not in the model pool (it holds {names})")
        return want
    if len(names) != 1:
        raise ValueError(
            f"{what}: the model pool holds {len(names)} fine-tuned models {names}; name one with finetuned=NAME"
        )
    return names[0]


def _plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- WiSE-FT
class WiSEFTAlgorithm(BaseAlgorithm):
    """WiSE-FT: ``(1 - alpha) * theta_pretrained + alpha * theta_finetuned`` for every floating-point key
    (:func:`dawin_ext.wise_ft`, dawin-ext's blend kernel). Returns a copy of the pool's pretrained model holding the
    merged weights; the pool's models are not modified.

    Args:
        alpha: weight on the fine-tuned model, in [0, 1].
        finetuned: the fine-tuned model's name in the pool (default: the pool's only non-special model).
    """

    def __init__(self, alpha: float = 0.5, finetuned: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.finetuned = finetuned

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        name = _finetuned_names(modelpool, self.finetuned, "dawin/wise_ft")
        pretrained = modelpool.load_pretrained_model()
        finetuned = modelpool.load_model(name)
        merged_sd = wise_ft(pretrained.state_dict(), finetuned.state_dict(), self.alpha)
        merged = copy.deepcopy(pretrained)
        merged.load_state_dict(merged_sd, strict=True)
        log.info("dawin/wise_ft: merged '%s' and '%s' with alpha=%s", _PRETRAINED, name, self.alpha)
        return merged


# ---------------------------------------------------------------------------------------------------- DaWin module
class _Pooled(nn.Module):
    """Vision transformer -> pooled output (what fusion_bench's classifier projects): ``[B, 3, H, W] -> [B, D]``."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.vision_model = tower

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.vision_model(pixel_values=pixel_values)
        return out.pooler_output if hasattr(out, "pooler_output") else out[1]


class _TowerOutputs(_Pooled):
    """Vision transformer -> ``(last_hidden_state, pooler_output)``, what the returned module reports."""

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        out = self.vision_model(pixel_values=pixel_values)
        return out[0], out.pooler_output if hasattr(out, "pooler_output") else out[1]


def _route_outputs(towers: Sequence[nn.Module], x: Tensor, assignment: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample through ``towers[assignment[i]]`` (each tower once, on its sub-batch), like
    :func:`dawin_ext.methods.inference.route` for a two-output module: (last_hidden_state, pooler_output) in ``x``'s order."""
    assignment = torch.as_tensor(assignment, dtype=torch.long).cpu()
    hidden = pooled = None
    for k in torch.unique(assignment).tolist():
        idx = (assignment == k).nonzero().squeeze(1)
        h, p = towers[k](x[idx.to(x.device)])
        if hidden is None:
            hidden = h.new_empty((x.shape[0], *h.shape[1:]))
            pooled = p.new_empty((x.shape[0], *p.shape[1:]))
        hidden[idx.to(h.device)] = h
        pooled[idx.to(p.device)] = p
    assert hidden is not None and pooled is not None
    return hidden, pooled


class _ProjectedHead(nn.Module):
    """Pooled output -> logits: ``normalize(projection(p)) @ weight.T + bias`` (multi-task DaWin's task head)."""

    def __init__(self, projection: nn.Module, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.projection = copy.deepcopy(projection)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, pooled: Tensor) -> Tensor:
        return F.linear(F.normalize(self.projection(pooled), dim=-1), self.weight, self.bias)


class _TaskState:
    """One task's fitted DaWin (two-model) or DaWinMultiTask, and how to get pooled outputs from it."""

    def __init__(self, kind: str, fitted: DaWin | DaWinMultiTask, sources: list[dict[str, Tensor]]) -> None:
        self.kind = kind
        self.fitted = fitted
        self.sources = sources  # _Pooled state dicts: [zs, ft] or [theta_0, theta_0 + tau_1, ...]
        self._exact = None

    def cluster_towers(self) -> list[nn.Module]:
        # HFCLIPClassifier (two-model DaWin) and _Pooled (multi-task) cluster models both hold .vision_model.
        return [_TowerOutputs(m.vision_model) for m in self.fitted.clusters.models]

    @torch.no_grad()
    def outputs(self, x: Tensor, mode: str) -> tuple[Tensor, Tensor]:
        """(last_hidden_state, pooler_output) of the image tower, each sample under its DaWin weights."""
        f = self.fitted
        x = x.to(f.device)
        if self.kind == "dawin":
            lam = f.coefficients(x)
            if mode == "cluster":
                return _route_outputs(self.cluster_towers(), x, f.assign(lam))
            rows = torch.stack([1.0 - lam, lam], dim=1)
        else:
            pi = f.coefficients(x)
            if mode == "cluster":
                assignment = torch.from_numpy(f.mixture_.predict(pi.detach().double().cpu().numpy()))
                return _route_outputs(self.cluster_towers(), x, assignment)
            # Same rows as DaWinMultiTask's exact mode: sources [theta_0, theta_0 + tau_t], rows [1 - c*sum(pi), c*pi].
            scales = f.multiplier * pi.to(torch.float64)
            rows = torch.cat([1.0 - scales.sum(dim=1, keepdim=True), scales], dim=1)
        if self._exact is None:
            from ..exact import SampleWiseInterpolator

            # HFCLIPClassifier or _Pooled: both hold the tower as .vision_model, the sources' key prefix.
            self._exact = SampleWiseInterpolator(_TowerOutputs(copy.deepcopy(f.model.vision_model)), self.sources)
        return self._exact(x, rows.float().to(x.device))


class DaWinCLIPVisionModel(nn.Module):
    """What :class:`DaWinAlgorithm` and :class:`DaWinMultiTaskAlgorithm` return: a stand-in for a merged
    ``CLIPVisionModel`` whose weights depend on the sample.

    ``forward(pixel_values)`` returns a ``BaseModelOutputWithPooling`` whose ``last_hidden_state`` and
    ``pooler_output`` are, per sample, the image tower's outputs under that sample's DaWin weights (computed with the current task's zero-shot head;
    see the module docstring). Outputs are on the input's device; the fitted models stay where they were fitted.
    The fitted objects are in :attr:`fitted` (task name -> :class:`dawin_ext.DaWin` or
    :class:`dawin_ext.DaWinMultiTask`).
    """

    def __init__(self, states: Mapping[str, _TaskState], mode: str, method: str) -> None:
        super().__init__()
        check_mode(mode, method)
        if not states:
            raise ValueError(f"{method}: no task was fitted")
        self._states = dict(states)
        self.mode = mode
        self.method = method
        self.task: str | None = next(iter(self._states)) if len(self._states) == 1 else None
        # Registered so that parameter counts (fusion_bench's report) and .to() see the cluster models.
        self.cluster_models = nn.ModuleDict(
            {t.replace(".", "_"): nn.ModuleList(s.cluster_towers()) for t, s in self._states.items()}
        )
        self.requires_grad_(False)
        self.eval()

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda() (e.g. fusion_bench's fabric.to_device) leave the fitted models where DaWin fitted them
        # (the method's `device`): the cluster models are shared with the fitted DaWin objects, whose experts and
        # heads must stay on the same device. Outputs come back on the input's device.
        return self

    @property
    def tasks(self) -> list[str]:
        return list(self._states)

    @property
    def fitted(self) -> dict[str, DaWin | DaWinMultiTask]:
        return {t: s.fitted for t, s in self._states.items()}

    def set_task(self, task: str) -> DaWinCLIPVisionModel:
        """Selects the task whose head and fitted mixture the next forward passes use."""
        if task not in self._states:
            raise KeyError(
                f"{self.method}: task {task!r} was not fitted (fitted: {self.tasks}); the model pool's test_datasets "
                "(or the method's tasks) must include every task the task pool evaluates"
            )
        self.task = task
        return self

    def forward(self, pixel_values: Tensor, *args: Any, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self.task is None:
            raise RuntimeError(
                f"{self.method}: {len(self._states)} tasks were fitted ({self.tasks}); call set_task(name) first, or "
                "evaluate with the task pool dawin/clip_vision (DaWinCLIPVisionModelTaskPool), which does"
            )
        hidden, pooled = self._states[self.task].outputs(pixel_values, self.mode)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden.to(pixel_values.device), pooler_output=pooled.to(pixel_values.device)
        )

    def save_pretrained(self, path: str | Path, **_: Any) -> Path:
        """Writes each task's fitted state to ``path/<task>`` (:meth:`dawin_ext.DaWin.save` /
        :meth:`dawin_ext.DaWinMultiTask.save`: mixture, coefficients, hashes of the weights, not the weights) and
        ``path/dawin_fusion.json`` (method, mode, tasks)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        for task, state in self._states.items():
            state.fitted.save(out / task)
        meta = {"method": self.method, "mode": self.mode, "tasks": self.tasks}
        (out / "dawin_fusion.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return out


# ---------------------------------------------------------------------------------------------------- DaWin methods
class _XOnly:
    """Re-iterable view of a DataLoader of (images, labels) that yields the images only (labels are not read)."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.loader:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch


class _CLIPDaWinBase(BaseAlgorithm):
    """Shared parts of the two DaWin algorithms: tasks, heads and test images."""

    _name = "dawin"

    def __init__(
        self,
        *,
        mode: str = "cluster",
        tasks: Sequence[str] | None = None,
        classnames: Mapping[str, Sequence[str]] | None = None,
        templates: str | Sequence[str] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        device: str = "cpu",
        seed: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_mode(mode, self._name)
        if int(batch_size) < 1:
            raise ValueError(f"{self._name}: batch_size must be >= 1, got {batch_size}")
        self.mode = mode
        self.tasks = None if tasks is None else [str(t) for t in _plain(tasks)]
        self.classnames = {str(k): list(v) for k, v in (_plain(classnames) or {}).items()}
        self.templates = _plain(templates)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.device = torch.device(device)
        self.seed = int(seed)

    # -- pool access
    def _check_pool(self, modelpool: BaseModelPool) -> list[str]:
        for attr in ("load_clip_model", "load_processor"):
            if not hasattr(modelpool, attr):
                raise TypeError(
                    f"{self._name}: needs a CLIPVisionModelPool (its pretrained CLIPModel builds the zero-shot heads), "
                    f"got {type(modelpool).__name__}"
                )
        if not modelpool.has_pretrained:
            raise ValueError(f"{self._name}: the model pool has no '{_PRETRAINED}' model")
        available = list(modelpool.test_dataset_names)
        if not available:
            raise ValueError(
                f"{self._name}: the model pool has no test_datasets; DaWin fits its coefficients on each task's "
                "unlabeled test images, so the pool must list them (modelpool.test_datasets)"
            )
        tasks = available if self.tasks is None else self.tasks
        missing = [t for t in tasks if t not in available]
        if missing:
            raise ValueError(f"{self._name}: task {missing[0]!r} is not among the pool's test_datasets {available}")
        return tasks

    def _classnames_templates(self, task: str) -> tuple[list[str], list]:
        from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

        known = task in CLIPTemplateFactory._dataset_mapping
        if task in self.classnames:
            names = self.classnames[task]
        elif known:
            names = list(CLIPTemplateFactory.get_classnames_and_templates(task)[0])
        else:
            raise ValueError(
                f"{self._name}: fusion_bench has no class names for task {task!r}; give them in the method's "
                f"classnames: {{{task}: [...]}}"
            )
        if self.templates is not None:
            temps = get_templates(self.templates)
        elif known:
            temps = list(CLIPTemplateFactory.get_classnames_and_templates(task)[1])
        else:
            raise ValueError(
                f"{self._name}: fusion_bench has no templates for task {task!r}; give the method's templates (a list "
                "of '{}' strings, or 'openai' / 'simple' / 'classname')"
            )
        if task in self.classnames or not known:
            # fusion_bench's task pool (same process) then evaluates the task with the names and templates used here.
            callables = [t if callable(t) else t.format for t in temps]
            CLIPTemplateFactory.register_dataset(
                task,
                dataset_info={"classnames": list(names), "templates": callables},
                classnames=list(names),
                templates=callables,
            )
        return list(names), temps

    def _images(self, modelpool: BaseModelPool, task: str, processor: Any) -> _XOnly:
        from fusion_bench.dataset.image_dataset import ImageClassificationDataset

        data = ImageClassificationDataset(modelpool.load_test_dataset(task), processor)
        loader = torch.utils.data.DataLoader(
            data, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )
        return _XOnly(loader)

    def _head(self, clip: nn.Module, processor: Any, task: str) -> tuple[Tensor, Tensor, list[str]]:
        names, temps = self._classnames_templates(task)
        weight, bias = hf_clip.build_hf_zero_shot_head(clip, processor.tokenizer, names, temps)
        return weight, bias, names


class DaWinAlgorithm(_CLIPDaWinBase):
    """DaWin between the pool's ``_pretrained_`` CLIP vision model and one fine-tuned model, fitted per task on the
    pool's unlabeled test images (see the module docstring). Returns a :class:`DaWinCLIPVisionModel`.

    Args:
        mode: ``cluster`` (Beta-mixture clusters, one merged model each) or ``exact`` (per-sample weights).
        n_clusters: mixture components K (the reference uses 3).
        temperatures: entropy temperatures (zero-shot, fine-tuned).
        offset_adjustment: DaWin's per-dataset offset adjustment.
        finetuned: the fine-tuned model's name (default: the pool's only non-special model).
        tasks: test datasets to fit (default: all of the pool's).
        classnames: ``{task: [names]}`` for tasks fusion_bench does not know (or to override it).
        templates: prompt templates (``'{}'`` strings or a dawin-ext set name); default: fusion_bench's per task.
        batch_size, num_workers: of the DataLoader that reads the test images.
        device: where the models run while fitting and predicting.
        seed: the mixture's k-means seed.
    """

    _name = "dawin/dawin"

    def __init__(
        self,
        mode: str = "cluster",
        n_clusters: int = 3,
        temperatures: Sequence[float] = (1.0, 1.0),
        offset_adjustment: bool = False,
        finetuned: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, **kwargs)
        self.n_clusters = int(n_clusters)
        self.temperatures = tuple(float(t) for t in _plain(temperatures))
        self.offset_adjustment = bool(offset_adjustment)
        self.finetuned = finetuned

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> DaWinCLIPVisionModel:
        tasks = self._check_pool(modelpool)
        name = _finetuned_names(modelpool, self.finetuned, self._name)
        clip = modelpool.load_clip_model(_PRETRAINED).to(self.device).eval()
        processor = modelpool.load_processor()
        zs_model, ft_model = modelpool.load_pretrained_model(), modelpool.load_model(name)
        hf_clip.check_same_vision_architecture(zs_model, ft_model, (f"'{_PRETRAINED}'", f"{name!r}"))
        zs_tower = _tower(zs_model).to(self.device).eval()
        ft_tower = _tower(ft_model).to(self.device).eval()
        check_keys_and_shapes(
            ft_tower.state_dict(), zs_tower.state_dict(), f"{self._name}: {name!r}", f"'{_PRETRAINED}'"
        )
        states = {}
        for task in tasks:
            weight, bias, names = self._head(clip, processor, task)
            zs = hf_clip.HFCLIPClassifier(
                copy.deepcopy(zs_tower), copy.deepcopy(clip.visual_projection), weight, bias, names
            )
            ft = hf_clip.HFCLIPClassifier(
                copy.deepcopy(ft_tower), copy.deepcopy(clip.visual_projection), weight, bias, names
            )
            dawin = DaWin(
                zs.eval(),
                _plain_state_dict(zs),
                _plain_state_dict(ft),
                temperatures=self.temperatures,
                offset_adjustment=self.offset_adjustment,
                n_clusters=self.n_clusters,
                seed=self.seed,
            ).fit(self._images(modelpool, task, processor))
            sources = [_plain_state_dict(_Pooled(zs.vision_model)), _plain_state_dict(_Pooled(ft.vision_model))]
            states[task] = _TaskState("dawin", dawin, sources)
            log.info(
                "%s: task %s fitted on %d test images; cluster coefficients %s",
                self._name,
                task,
                dawin.n_samples_,
                [round(float(c), 4) for c in dawin.cluster_coefficients_],
            )
        return DaWinCLIPVisionModel(states, self.mode, self._name)


class DaWinMultiTaskAlgorithm(_CLIPDaWinBase):
    """Multi-task DaWin: ``theta_0 + sum_t c * pi_t(x) * tau_t`` over the pool's ``_pretrained_`` (``theta_0``) and
    every fine-tuned model (``tau_t = theta_t - theta_0``), with ``pi(x) = softmax_t(-H_t(x))`` from each task model's
    entropy under the evaluated task's zero-shot head, fitted per task on the pool's unlabeled test images (see the
    module docstring). Returns a :class:`DaWinCLIPVisionModel`.

    Args:
        scale: per-task scale; ``c = scale * T`` (the reference: 0.3), or ``scale`` with ``scale_by_tasks: false``.
        n_clusters: Dirichlet-mixture components (the reference's default, 1: one merge per task).
        mode, tasks, classnames, templates, batch_size, num_workers, device, seed: as :class:`DaWinAlgorithm`.
    """

    _name = "dawin/dawin_multitask"

    def __init__(
        self, mode: str = "cluster", scale: float = 0.3, scale_by_tasks: bool = True, n_clusters: int = 1, **kwargs: Any
    ) -> None:
        kwargs.setdefault("seed", 0)
        super().__init__(mode=mode, **kwargs)
        self.scale = float(scale)
        self.scale_by_tasks = bool(scale_by_tasks)
        self.n_clusters = int(n_clusters)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> DaWinCLIPVisionModel:
        tasks = self._check_pool(modelpool)
        names = list(modelpool.model_names)
        if not names:
            raise ValueError(f"{self._name}: the model pool holds no fine-tuned models")
        clip = modelpool.load_clip_model(_PRETRAINED).to(self.device).eval()
        processor = modelpool.load_processor()
        base_model = modelpool.load_pretrained_model()
        base = _Pooled(_tower(base_model).to(self.device).eval())
        theta_0 = _plain_state_dict(base)
        thetas = []
        for n in names:
            model = modelpool.load_model(n)
            hf_clip.check_same_vision_architecture(base_model, model, (f"'{_PRETRAINED}'", f"{n!r}"))
            tower = _tower(model).to(self.device).eval()
            check_keys_and_shapes(
                tower.state_dict(), base.vision_model.state_dict(), f"{self._name}: {n!r}", f"'{_PRETRAINED}'"
            )
            thetas.append(_plain_state_dict(_Pooled(tower)))
        states = {}
        for task in tasks:
            weight, bias, _ = self._head(clip, processor, task)
            head = _ProjectedHead(clip.visual_projection, weight, bias).eval()
            mt = DaWinMultiTask(
                copy.deepcopy(base),
                theta_0,
                thetas,
                head=head,
                scale=self.scale,
                scale_by_tasks=self.scale_by_tasks,
                n_clusters=self.n_clusters,
                seed=self.seed,
            ).fit(self._images(modelpool, task, processor))
            sources = [theta_0, *[_plain_state_dict(m) for m in mt.task_models.models]]
            states[task] = _TaskState("multitask", mt, sources)
            log.info(
                "%s: task %s fitted on %d test images over %d task models", self._name, task, mt.n_samples_, len(names)
            )
        return DaWinCLIPVisionModel(states, self.mode, self._name)


# ---------------------------------------------------------------------------------------------------- task pool
def _task_pool_class() -> type:
    """Builds :class:`DaWinCLIPVisionModelTaskPool` on first use: fusion_bench's CLIP task pool module needs a
    transformers version it supports (fusion_bench 0.2.33 imports ``CLIPVisionTransformer``, which transformers 5
    no longer has), and the algorithms above must stay usable where it does not import."""
    try:
        from fusion_bench.taskpool.clip_vision.taskpool import CLIPVisionModelTaskPool
    except ImportError as e:
        import transformers

        raise ImportError(
            "DaWinCLIPVisionModelTaskPool subclasses fusion_bench's CLIPVisionModelTaskPool, which does not import "
            f"here (transformers {transformers.__version__}): {e}. fusion_bench's CLIP task pools need a "
            "transformers version that fusion_bench supports (4.x for fusion_bench 0.2.33); the dawin methods "
            "themselves (and merged_model_save_path) work without it"
        ) from e

    class DaWinCLIPVisionModelTaskPool(CLIPVisionModelTaskPool):
        """fusion_bench's ``CLIPVisionModelTaskPool`` that tells a :class:`DaWinCLIPVisionModel` which task it is
        evaluating (``set_task``) before each task, so that DaWin's coefficients use that task's head and mixture.
        Any other model is evaluated exactly as by the parent class."""

        def on_task_evaluation_begin(self, classifier: nn.Module, task_name: str) -> None:
            super().on_task_evaluation_begin(classifier, task_name)
            vision = getattr(classifier, "vision_model", None)
            if isinstance(vision, DaWinCLIPVisionModel):
                vision.set_task(task_name)

    DaWinCLIPVisionModelTaskPool.__module__ = __name__
    return DaWinCLIPVisionModelTaskPool


def __getattr__(name: str) -> Any:
    # Hydra resolves `_target_: dawin_ext.integrations.fusion_bench.DaWinCLIPVisionModelTaskPool` through getattr.
    if name == "DaWinCLIPVisionModelTaskPool":
        cls = _task_pool_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
