"""PEFT LoRA adapters as interpolation sources: exact per-sample merging without a merged copy of the weights.

A source is "base weights + a LoRA adapter". For a linear layer with base ``W0, b0`` and adapters
``s = 1 .. S-1`` (``A_s [R, IN]``, ``B_s [OUT, R]``, ``scale_s = lora_alpha / r``, or ``lora_alpha / sqrt(r)``
with rsLoRA), sample ``b`` with coefficient row ``c[b]`` (summing to 1, source 0 = the base) has the output

    W0 x + b0 + sum_s c[b, s] scale_s B_s (A_s x),

which is exactly ``F.linear`` with the per-sample merged weight ``sum_s c[b, s] (W0 + scale_s B_s A_s)``. The exact
engine (:mod:`dawin_ext.exact`) holds every adapted weight as a low-rank stack and runs the layer through the
compiled op :func:`dawin_ext.ops.samplewise_lora`: one base GEMM, one shrink GEMM against all adapters' ``A``, a
per-sample scaling of each sample's rank blocks, and one expand GEMM. No merged weight and no ``[B, OUT, IN]`` copy.

Supported adapter layouts (anything else is refused, naming the module): LoRA on ``nn.Linear`` and on
``nn.MultiheadAttention`` (PEFT's MHA support: ``in_proj_weight`` and ``out_proj``), any rank (adapters of
different ranks mix), per-layer ``rank_pattern`` / ``alpha_pattern`` and rsLoRA. Refused: DoRA (its magnitude
normalisation is not linear in the adapter), LoRA on convolutions, embeddings or ``Conv1D`` (``fan_in_fan_out``),
``lora_bias``, other LoRA variants, and adapters that also train full tensors (``bias != "none"``,
``modules_to_save``, trainable tokens).

``peft`` is an optional dependency (``pip install 'dawin-ext[lora]'``); ``import dawin_ext`` does not import it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..exact import SampleWiseInterpolator
from ..exact.engine import LowRankStack, UnsupportedParameterError, make_low_rank_stack

__all__ = [
    "LoraSources",
    "UnsupportedAdapterError",
    "load_lora_sources",
    "lora_interpolator",
    "use_lora_exact",
]


class UnsupportedAdapterError(UnsupportedParameterError):
    """An adapter layout whose mixing is not exactly ``W0 + sum_s c_s scale_s B_s A_s`` (DoRA, conv / embedding
    LoRA, trained full tensors, ...)."""


def _require_peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            "dawin_ext.integrations.lora loads adapters with peft, which is not installed: pip install 'dawin-ext[lora]' "
            "(or pip install peft)"
        ) from e
    return peft


@dataclass
class LoraSources:
    """A base module and its LoRA adapters: source 0 is the base, source ``s`` (1..S-1) is base + adapter ``s``.

    ``factors`` maps a weight's state-dict key (e.g. ``"visual.transformer.resblocks.0.attn.in_proj_weight"``) to
    ``[(source, A [R, IN], B [OUT, R], scale), ...]`` for the adapters that touch it.
    """

    base: nn.Module
    adapters: list[str]
    factors: dict[str, list[tuple[int, Tensor, Tensor, float]]] = field(repr=False)
    modules: dict[str, str] = field(repr=False)  # weight key -> module path

    @property
    def num_sources(self) -> int:
        return 1 + len(self.adapters)

    def merged_state_dict(self, source: int) -> dict[str, Tensor]:
        """Source ``source`` as a full state dict (base + ``scale B A`` merged, computed in float64 and rounded
        once). For reference checks and for fitting DaWin; the exact pass itself never builds it."""
        if not 0 <= source < self.num_sources:
            raise ValueError(f"source must be in [0, {self.num_sources}), got {source}")
        sd = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
        for key, facs in self.factors.items():
            for src, a, b, scale in facs:
                if src == source:
                    w = sd[key]
                    sd[key] = (w.double() + scale * (b.double() @ a.double()).to(w.device)).to(w.dtype)
        return sd

    def interpolator(self, **kwargs) -> SampleWiseInterpolator:
        """A :class:`~dawin_ext.exact.SampleWiseInterpolator` over these sources whose adapted weights are
        low-rank stacks: ``swi(x, rows)`` with ``rows [B, S]`` summing to 1 (``[1 - lam, lam]`` for DaWin, or
        :func:`~dawin_ext.exact.task_vector_coefficients` for several adapters). ``kwargs`` go to its
        constructor (``strict``, ``materialize_budget_bytes``, ...)."""
        sd = self.base.state_dict()
        swi = SampleWiseInterpolator(self.base, [sd] * self.num_sources, **kwargs)
        work = swi.net
        stacks: dict[str, LowRankStack] = {}
        for key, facs in self.factors.items():
            owner_path, leaf = key.rsplit(".", 1) if "." in key else ("", key)
            owner = work.get_submodule(owner_path)
            t = owner._parameters.get(leaf)
            if t is None or t.is_meta:
                raise UnsupportedAdapterError(f"LoRA target {key!r} is not a plain parameter of the module")
            ph = nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False)
            stacks[key] = make_low_rank_stack(key, t.detach(), facs, ph, module=self.modules[key])
            owner._parameters[leaf] = ph
        swi._engine.add_low_rank_stacks(stacks)
        swi.varying_keys = sorted(set(swi.varying_keys) | set(stacks))
        return swi


def _clean_path(name: str) -> str:
    """PEFT's module name -> the base module's (drops ``base_model.model.`` and every ``base_layer`` level)."""
    parts = [p for p in name.split(".") if p != "base_layer"]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(parts)


def load_lora_sources(base: nn.Module, adapter_dirs: Sequence[str | Path]) -> LoraSources:
    """Loads PEFT LoRA adapters (``save_pretrained`` directories) for ``base`` with ``peft``.

    Source 0 is ``base`` itself and source ``i + 1`` is base + ``adapter_dirs[i]``. ``base`` is not modified (PEFT
    injects into a copy). Raises :class:`UnsupportedAdapterError` naming the module for layouts that cannot be
    mixed exactly (DoRA, conv / embedding LoRA, ``lora_bias``, trained full tensors, ...).
    """
    peft = _require_peft()
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import MultiheadAttention as LoraMHA
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(base, nn.Module):
        raise TypeError(f"base must be an nn.Module, got {type(base).__name__}")
    if isinstance(adapter_dirs, (str, Path)) or len(adapter_dirs) == 0:
        raise ValueError("adapter_dirs must be a non-empty sequence of adapter directories")
    dirs = [Path(d) for d in adapter_dirs]
    for d in dirs:
        if not (d / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{d} is not a PEFT adapter directory (no adapter_config.json)")
    names = [f"source{i + 1}" for i in range(len(dirs))]
    for d, n in zip(dirs, names, strict=True):
        cfg = peft.PeftConfig.from_pretrained(str(d))
        if cfg.peft_type != peft.PeftType.LORA:
            raise UnsupportedAdapterError(
                f"adapter {d} is a {cfg.peft_type} adapter; dawin_ext.integrations.lora mixes LoRA only"
            )
        if getattr(cfg, "use_dora", False):
            # PEFT refuses DoRA on some layers (MHA) itself; name the first targeted module here.
            raise UnsupportedAdapterError(
                f"adapter {d} ({n}) uses DoRA (use_dora=True) on {_first_target(base, cfg)!r}: its magnitude "
                "normalisation is not linear in the adapter, so per-sample mixing cannot be exact"
            )
    work = copy.deepcopy(base)
    try:
        model = peft.PeftModel.from_pretrained(work, str(dirs[0]), adapter_name=names[0])
        for d, n in zip(dirs[1:], names[1:], strict=True):
            model.load_adapter(str(d), adapter_name=n)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise UnsupportedAdapterError(
            f"peft could not load the adapters {[str(d) for d in dirs]} onto base: {e}"
        ) from e
    base_params = dict(base.named_parameters(remove_duplicate=False))
    factors: dict[str, list[tuple[int, Tensor, Tensor, float]]] = {}
    modules: dict[str, str] = {}
    for mname, mod in model.named_modules():
        if not isinstance(mod, BaseTunerLayer):
            continue
        path = _clean_path(mname)
        if not isinstance(mod, LoraLayer):
            raise UnsupportedAdapterError(f"module {path!r} carries a {type(mod).__name__} adapter, which is not LoRA")
        for src, n in enumerate(names, start=1):
            if n in getattr(mod, "lora_embedding_A", {}):
                raise UnsupportedAdapterError(
                    f"module {path!r}: embedding LoRA ({dirs[src - 1]}) is not supported, only nn.Linear and "
                    "nn.MultiheadAttention"
                )
            if n not in mod.lora_A:
                continue
            if mod.use_dora.get(n, False):
                raise UnsupportedAdapterError(
                    f"module {path!r}: adapter {dirs[src - 1]} uses DoRA, whose magnitude normalisation is not "
                    "linear in the adapter, so per-sample mixing cannot be exact"
                )
            if getattr(mod, "lora_bias", {}).get(n, False):
                raise UnsupportedAdapterError(f"module {path!r}: adapter {dirs[src - 1]} has lora_bias=True")
            if n in getattr(mod, "lora_variant", {}):
                raise UnsupportedAdapterError(
                    f"module {path!r}: adapter {dirs[src - 1]} is a {type(mod.lora_variant[n]).__name__} LoRA "
                    "variant, not plain LoRA"
                )
            if type(mod) is LoraMHA:
                key = f"{path}.in_proj_weight" if path else "in_proj_weight"
            elif type(mod) is LoraLinear and isinstance(mod.get_base_layer(), nn.Linear) and not mod.fan_in_fan_out:
                key = f"{path}.weight" if path else "weight"
            else:
                raise UnsupportedAdapterError(
                    f"module {path!r}: LoRA on {type(mod.get_base_layer()).__name__} ({type(mod).__name__}) is not "
                    "supported; only nn.Linear and nn.MultiheadAttention"
                )
            if key not in base_params:
                raise UnsupportedAdapterError(f"module {path!r}: its weight {key!r} is not a parameter of base")
            a = mod.lora_A[n].weight.detach()
            b = mod.lora_B[n].weight.detach()
            w = base_params[key]
            if a.dim() != 2 or b.dim() != 2 or tuple(w.shape) != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
                raise UnsupportedAdapterError(
                    f"module {path!r}: LoRA factors A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the weight "
                    f"{key!r} {tuple(w.shape)}"
                )
            factors.setdefault(key, []).append(
                (src, a.to(w.device).clone(), b.to(w.device).clone(), float(mod.scaling[n]))
            )
            modules[key] = path
    # after the module walk, so that LoRA layouts (embedding LoRA, DoRA) are named as such first
    for n, d in zip(names, dirs, strict=True):
        sd = peft.get_peft_model_state_dict(model, adapter_name=n)
        for k in sd:
            if ".lora_A." not in k and ".lora_B." not in k:
                raise UnsupportedAdapterError(
                    f"adapter {d} trains the full tensor {k!r} (bias, modules_to_save or trainable tokens); only "
                    "LoRA factors are mixed per sample"
                )
    if not factors:
        raise UnsupportedAdapterError(f"the adapters {[str(d) for d in dirs]} adapt no module of base")
    return LoraSources(base, [str(d) for d in dirs], factors, modules)


def _first_target(base: nn.Module, cfg) -> str:
    targets = cfg.target_modules
    for name, _ in base.named_modules():
        if isinstance(targets, str):
            import re

            if re.fullmatch(targets, name):
                return name
        elif targets and any(name == t or name.endswith("." + t) for t in targets):
            return name
    return str(targets)


def lora_interpolator(base: nn.Module, adapter_dirs: Sequence[str | Path], **kwargs) -> SampleWiseInterpolator:
    """``load_lora_sources(base, adapter_dirs).interpolator(**kwargs)``: the exact per-sample engine over
    ``[base, base + adapter_1, ...]`` with every adapted weight as a low-rank stack."""
    return load_lora_sources(base, adapter_dirs).interpolator(**kwargs)


def use_lora_exact(method, sources: LoraSources, **kwargs) -> None:
    """Makes a fitted :class:`~dawin_ext.methods.dawin.DaWin` (2 sources: base, base + adapter) or
    :class:`~dawin_ext.methods.multitask.DaWinMultiTask` (base + one adapter per task) run ``mode="exact"`` through the
    low-rank engine instead of full-weight stacks. Build the method with ``sources.merged_state_dict(s)`` as its
    state dicts (fitting needs each source's logits); the exact pass then never touches a merged weight."""
    if hasattr(method, "theta_zs"):
        expected = 2
    elif hasattr(method, "task_models"):
        expected = 1 + len(method.task_models.buffers)
    else:
        raise TypeError(f"use_lora_exact: expected a DaWin or DaWinMultiTask, got {type(method).__name__}")
    if sources.num_sources != expected:
        raise ValueError(
            f"use_lora_exact: {type(method).__name__} mixes {expected} sources but the LoRA sources have "
            f"{sources.num_sources} (base + {len(sources.adapters)} adapters)"
        )
    method._exact = sources.interpolator(**kwargs)
