"""Saving and loading fitted predictors: a directory holding ``meta.json`` and ``tensors.safetensors``.

What a fit produces is stored, never the weights themselves: the caller hands the same weights to ``load``
again, and ``load`` proves they are the same by a content hash.

Layout of a saved directory (``FORMAT_VERSION`` 1):

* ``tensors.safetensors``: every fitted array (coefficients, cluster assignments, logits, the mixture's
  parameters), at full precision (float64 stays float64), written with :mod:`safetensors`.
* ``meta.json``: ``format`` (which class wrote it), ``format_version``, the dawin-ext version, the settings,
  the scalar results (offset statistics, iteration counts), the weight hashes, and the size and BLAKE2b digest
  of ``tensors.safetensors``, so that a truncated or corrupted tensor file is refused before it is parsed.

**The weight hash** (:func:`state_dict_digests`) covers, for every key: the key name, the dtype, the shape and the
raw bytes of the tensor's values (read from the CPU, C-contiguous). It does not cover the order of the keys (a
safetensors file returns them sorted), the device, strides, ``requires_grad`` or the module the weights came from;
two state dicts with the same hash hold bit-identical values under the same names. Per-key digests are stored as well, so a refusal names the
keys that differ. The cost is one read of the weights (about 1 GB/s: ~0.6 s for the full ViT-B-32 CLIP).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FORMAT_VERSION",
    "SavedStateError",
    "WeightMismatchError",
    "state_dict_digests",
    "check_weights",
    "write_saved",
    "read_saved",
    "mixture_state",
    "restore_mixture",
]

#: Version of the on-disk layout; ``load`` refuses any other.
FORMAT_VERSION = 1
META_NAME = "meta.json"
TENSORS_NAME = "tensors.safetensors"
_DIGEST_BYTES = 16


class SavedStateError(ValueError):
    """A saved predictor cannot be read: missing, truncated or corrupted files, another format or version."""


class WeightMismatchError(ValueError):
    """The weights given to ``load`` are not the ones the saved predictor was fitted with."""


# ---------------------------------------------------------------------------------------------- hashing
def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    # A uint8 view works for every dtype (bfloat16 has no numpy equivalent); numpy then exposes the buffer
    # without a copy.
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def state_dict_digests(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, str]]:
    """Content hash of a state dict: ``(overall hex digest, {key: hex digest})``.

    Each key's digest is BLAKE2b (16 bytes) over its name, dtype, shape and value bytes; the overall digest is
    BLAKE2b over the per-key digests in sorted key order, so it changes when a key is added or removed but not
    when the keys are listed in another order.
    """
    per_key: dict[str, str] = {}
    total = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for key, t in state_dict.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state_dict_digests: entry {key!r} is a {type(t).__name__}, not a tensor")
        h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
        per_key[key] = h.hexdigest()
    for key in sorted(per_key):
        total.update(key.encode() + b"\0" + bytes.fromhex(per_key[key]))
    return total.hexdigest(), per_key


def weight_record(state_dict: Mapping[str, Tensor]) -> dict:
    """What ``meta.json`` stores about one state dict."""
    digest, per_key = state_dict_digests(state_dict)
    return {"digest": digest, "keys": per_key}


def check_weights(name: str, record: Mapping, state_dict: Mapping[str, Tensor], where: str) -> None:
    """Raises :class:`WeightMismatchError` naming the keys of ``state_dict`` that differ from ``record``."""
    digest, per_key = state_dict_digests(state_dict)
    if digest == record.get("digest"):
        return
    saved: dict[str, str] = dict(record.get("keys", {}))
    missing = [k for k in saved if k not in per_key]
    extra = [k for k in per_key if k not in saved]
    changed = [k for k in per_key if k in saved and per_key[k] != saved[k]]
    parts = []
    if changed:
        parts.append(f"{len(changed)} key(s) hold different values, dtypes or shapes, first {changed[:3]}")
    if missing:
        parts.append(f"{len(missing)} fitted key(s) are missing, first {missing[:3]}")
    if extra:
        parts.append(f"{len(extra)} key(s) were not in the fitted weights, first {extra[:3]}")
    raise WeightMismatchError(
        f"{where}: the {name} weights given to load() are not the ones this predictor was fitted with: "
        + "; ".join(parts)
        + f" (content hash {digest} != fitted {record.get('digest')}). Pass the fitted weights, or fit again."
    )


# ---------------------------------------------------------------------------------------------- files
def _file_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=_DIGEST_BYTES).hexdigest()


def _check_json_value(value, where: str):
    """Refuses NaN/Inf in what goes to JSON (json would write non-standard tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: cannot store the non-finite value {value}")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_json_value(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json_value(v, f"{where}[{i}]")


def write_saved(path: str | os.PathLike[str], kind: str, meta: dict, tensors: Mapping[str, Tensor]) -> Path:
    """Writes ``meta`` (plus format, version and the tensor file's digest) and ``tensors`` into directory
    ``path`` (created if needed). Each file is written to a temporary name and renamed, so a crash never
    leaves a half-written file under the final name."""
    from safetensors.torch import save as st_save

    from ..ops._loader import BUILD_INFO

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{kind}.save: {str(path)!r} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    # Copies on the CPU: the caller's tensors are never touched, and shared storages are fine.
    data = st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    full = {
        "format": kind,
        "format_version": FORMAT_VERSION,
        "dawin_ext_version": BUILD_INFO["version"],
        **meta,
        "tensors_file": {"name": TENSORS_NAME, "bytes": len(data), "blake2b": _file_digest(data)},
    }
    _check_json_value(full, kind)
    text = json.dumps(full, indent=1, allow_nan=False)
    for name, payload in ((TENSORS_NAME, data), (META_NAME, text.encode())):
        tmp = path / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / name)
    return path


def read_saved(path: str | os.PathLike[str], kind: str) -> tuple[dict, dict[str, Tensor]]:
    """Reads and verifies a directory written by :func:`write_saved` for class ``kind``; returns (meta, tensors).

    Raises :class:`SavedStateError` for a missing directory or file, a ``meta.json`` that is not valid JSON,
    another class's or another version's format, and a tensor file whose size or digest differs from the one
    recorded (truncated or corrupted).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    meta_path, tensors_path = path / META_NAME, path / TENSORS_NAME
    if not path.is_dir():
        raise SavedStateError(f"{kind}.load: {str(path)!r} is not a directory written by {kind}.save")
    for p in (meta_path, tensors_path):
        if not p.is_file():
            raise SavedStateError(f"{kind}.load: {str(p)!r} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SavedStateError(
            f"{kind}.load: {str(meta_path)!r} is not valid JSON (truncated or corrupted?): {e}"
        ) from e
    if not isinstance(meta, dict):
        raise SavedStateError(f"{kind}.load: {str(meta_path)!r} holds a {type(meta).__name__}, not an object")
    if meta.get("format") != kind:
        raise SavedStateError(f"{kind}.load: {str(path)!r} was written by {meta.get('format')!r}, not {kind!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise SavedStateError(
            f"{kind}.load: {str(path)!r} has format version {version!r} (written by dawin-ext "
            f"{meta.get('dawin_ext_version')!r}); this dawin-ext reads version {FORMAT_VERSION} only"
        )
    record = meta.get("tensors_file")
    if not isinstance(record, dict) or not {"bytes", "blake2b"} <= set(record):
        raise SavedStateError(f"{kind}.load: {str(meta_path)!r} lacks the tensor file's size and digest")
    data = tensors_path.read_bytes()
    if len(data) != record["bytes"]:
        raise SavedStateError(
            f"{kind}.load: {str(tensors_path)!r} has {len(data)} bytes but {record['bytes']} were written "
            "(truncated or replaced)"
        )
    if _file_digest(data) != record["blake2b"]:
        raise SavedStateError(
            f"{kind}.load: {str(tensors_path)!r} is corrupted: its BLAKE2b digest differs from the one recorded "
            "when it was written"
        )
    try:
        tensors = st_load(data)
    except SafetensorError as e:  # pragma: no cover - the digest already matched what safetensors wrote
        raise SavedStateError(f"{kind}.load: {str(tensors_path)!r} is not a valid safetensors file: {e}") from e
    return meta, tensors


def require(meta: Mapping, tensors: Mapping[str, Tensor], kind: str, keys=(), tensor_keys=()) -> None:
    """Raises :class:`SavedStateError` naming the first missing entry."""
    for k in keys:
        if k not in meta:
            raise SavedStateError(f"{kind}.load: meta.json lacks {k!r}")
    for k in tensor_keys:
        if k not in tensors:
            raise SavedStateError(f"{kind}.load: the tensor file lacks {k!r}")


# ---------------------------------------------------------------------------------------------- mixtures
_MIXTURE_SETTINGS = ("n_components", "seed", "n_init", "max_iter", "tol", "clip_eps")
_MIXTURE_ARRAYS = {
    "BetaMixture": ("weights_", "alphas_", "betas_", "means_"),
    "DirichletMixture": ("weights_", "params_"),
}
_MIXTURE_SCALARS = ("lower_bound_", "converged_", "n_iter_")


def mixture_state(mixture, prefix: str) -> tuple[dict, dict[str, Tensor]]:
    """(JSON-able settings and scalars, float64 tensors named ``prefix + attribute``) of a fitted mixture."""
    name = type(mixture).__name__
    if name not in _MIXTURE_ARRAYS:
        raise TypeError(f"cannot save a {name}")
    meta = {"class": name, "settings": {k: getattr(mixture, k) for k in _MIXTURE_SETTINGS}}
    for k in _MIXTURE_SCALARS:
        if hasattr(mixture, k):
            v = getattr(mixture, k)
            meta[k] = (
                bool(v) if isinstance(v, bool | np.bool_) else (int(v) if isinstance(v, int | np.integer) else float(v))
            )
    tensors = {
        prefix + k: torch.from_numpy(np.array(getattr(mixture, k), dtype=np.float64)) for k in _MIXTURE_ARRAYS[name]
    }
    return meta, tensors


def restore_mixture(meta: Mapping, tensors: Mapping[str, Tensor], prefix: str, kind: str):
    """Rebuilds a fitted mixture from :func:`mixture_state`'s output (no refitting)."""
    from .mixture import BetaMixture, DirichletMixture

    classes = {"BetaMixture": BetaMixture, "DirichletMixture": DirichletMixture}
    name = meta.get("class")
    if name not in classes:
        raise SavedStateError(f"{kind}.load: unknown mixture class {name!r}")
    m = classes[name](**meta["settings"])
    for k in _MIXTURE_ARRAYS[name]:
        if prefix + k not in tensors:
            raise SavedStateError(f"{kind}.load: the tensor file lacks {prefix + k!r}")
        setattr(m, k, tensors[prefix + k].numpy().copy())
    for k in _MIXTURE_SCALARS:
        if k in meta:
            setattr(m, k, meta[k])
    return m


# ---------------------------------------------------------------------------------------------- DaWin
_DAWIN_SETTINGS = (
    "expertise",
    "temperatures",
    "offset_adjustment",
    "n_clusters",
    "seed",
    "pseudo_label",
    "merged_alpha",
)


def save_dawin(obj, path: str | os.PathLike[str]) -> Path:
    """Writes a fitted :class:`~dawin_ext.DaWin` (see :meth:`DaWin.save`)."""
    obj._check_fitted()
    meta: dict = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k in _DAWIN_SETTINGS for v in [getattr(obj, k)]},
        "weights": {"theta_zs": weight_record(obj.theta_zs), "theta_ft": weight_record(obj.theta_ft)},
        "offset": list(obj.offset_) if obj.offset_ is not None else None,
        "n_samples": int(obj.n_samples_),
        "has_fit_labels": obj.fit_labels_ is not None,
    }
    tensors = {"coefficients": obj.coefficients_, "logits_zs": obj.logits_[0], "logits_ft": obj.logits_[1]}
    if obj.fit_labels_ is not None:
        tensors["fit_labels"] = obj.fit_labels_
    if obj.weight_space:
        meta["mixture"], mix = mixture_state(obj.mixture_, "mixture.")
        tensors.update(mix)
        tensors["labels"] = obj.labels_
        tensors["cluster_coefficients"] = obj.cluster_coefficients_
    return write_saved(path, "DaWin", meta, tensors)


def load_dawin(cls, path: str | os.PathLike[str], model, theta_zs, theta_ft):
    """Rebuilds a fitted :class:`~dawin_ext.DaWin` (see :meth:`DaWin.load`)."""
    from ..ops.statedict import as_state_dict

    meta, t = read_saved(path, "DaWin")
    require(
        meta, t, "DaWin", ("settings", "weights", "offset", "n_samples"), ("coefficients", "logits_zs", "logits_ft")
    )
    zs, ft = as_state_dict(theta_zs, "theta_zs"), as_state_dict(theta_ft, "theta_ft")
    # The hashes are checked before any model is built: a mismatch costs one read of the weights.
    check_weights("theta_zs", meta["weights"]["theta_zs"], zs, "DaWin.load")
    check_weights("theta_ft", meta["weights"]["theta_ft"], ft, "DaWin.load")
    settings = dict(meta["settings"])
    settings["temperatures"] = tuple(settings["temperatures"])
    obj = cls(model, zs, ft, **settings)
    obj.coefficients_ = t["coefficients"]
    obj.logits_ = (t["logits_zs"], t["logits_ft"])
    obj.fit_labels_ = t.get("fit_labels")
    obj.offset_ = tuple(meta["offset"]) if meta["offset"] is not None else None
    obj.n_samples_ = int(meta["n_samples"])
    if obj.coefficients_.shape != (obj.n_samples_,):
        raise SavedStateError(
            f"DaWin.load: {obj.n_samples_} fit samples but {tuple(obj.coefficients_.shape)} stored coefficients"
        )
    if obj.weight_space:
        require(meta, t, "DaWin", ("mixture",), ("labels", "cluster_coefficients"))
        obj.mixture_ = restore_mixture(meta["mixture"], t, "mixture.", "DaWin")
        obj.labels_ = t["labels"]
        obj.cluster_coefficients_ = t["cluster_coefficients"]
        if obj.cluster_coefficients_.shape != (obj.n_clusters,):
            raise SavedStateError(
                f"DaWin.load: n_clusters is {obj.n_clusters} but {tuple(obj.cluster_coefficients_.shape)} "
                "cluster coefficients are stored"
            )
        from .blended import BlendedModels

        obj.clusters = BlendedModels(obj.model, [obj.theta_zs, obj.theta_ft], n_models=obj.n_clusters)
        m = obj.cluster_coefficients_
        obj.clusters.blend(torch.stack([1.0 - m, m], dim=1))
    return obj


# ---------------------------------------------------------------------------------------------- multi-task
def _head_record(head) -> dict | None:
    if head is None:
        return None
    if isinstance(head, torch.nn.Module):
        return {"kind": "module", **weight_record(dict(head.state_dict()))}
    return {"kind": "callable"}  # a plain function holds no weights to hash


def save_multitask(obj, path: str | os.PathLike[str]) -> Path:
    """Writes a fitted :class:`~dawin_ext.DaWinMultiTask` (see :meth:`DaWinMultiTask.save`)."""
    obj._check_fitted()
    meta: dict = {
        "settings": {
            "scale": obj.scale,
            "scale_by_tasks": obj.scale_by_tasks,
            "n_clusters": obj.n_clusters,
            "seed": obj.seed,
        },
        "n_tasks": obj.n_tasks,
        "weights": {
            "theta_0": weight_record(obj.theta_0),
            "task_vectors": [weight_record(tau) for tau in obj.task_vectors],
        },
        "head": _head_record(obj.head),
        "n_samples": int(obj.n_samples_),
    }
    meta["mixture"], tensors = mixture_state(obj.mixture_, "mixture.")
    tensors.update({"pi": obj.pi_, "labels": obj.labels_, "cluster_pi": obj.cluster_pi_})
    return write_saved(path, "DaWinMultiTask", meta, tensors)


def load_multitask(cls, path, model, theta_0, task_thetas=None, *, task_vectors=None, head=None):
    """Rebuilds a fitted :class:`~dawin_ext.DaWinMultiTask` (see :meth:`DaWinMultiTask.load`)."""
    kind = "DaWinMultiTask"
    meta, t = read_saved(path, kind)
    require(
        meta,
        t,
        kind,
        ("settings", "weights", "n_tasks", "head", "n_samples", "mixture"),
        ("pi", "labels", "cluster_pi"),
    )
    given = len(task_thetas) if task_thetas is not None else len(task_vectors) if task_vectors is not None else None
    if given is not None and given != meta["n_tasks"]:
        raise WeightMismatchError(f"{kind}.load: fitted with {meta['n_tasks']} tasks but {given} were given")
    obj = cls(model, theta_0, task_thetas, task_vectors=task_vectors, head=head, **meta["settings"])
    check_weights("theta_0", meta["weights"]["theta_0"], obj.theta_0, f"{kind}.load")
    for i, (rec, tau) in enumerate(zip(meta["weights"]["task_vectors"], obj.task_vectors, strict=True)):
        check_weights(f"task {i} (task vector)", rec, tau, f"{kind}.load")
    saved_head, now = meta["head"], _head_record(head)
    if (saved_head is None) != (now is None) or (saved_head and now and saved_head["kind"] != now["kind"]):
        raise WeightMismatchError(
            f"{kind}.load: fitted with head {saved_head and saved_head['kind']!r} but given {now and now['kind']!r}"
        )
    if saved_head is not None and saved_head["kind"] == "module":
        check_weights("head", saved_head, dict(head.state_dict()), f"{kind}.load")
    obj.pi_, obj.labels_, obj.cluster_pi_ = t["pi"], t["labels"], t["cluster_pi"]
    obj.n_samples_ = int(meta["n_samples"])
    obj.mixture_ = restore_mixture(meta["mixture"], t, "mixture.", kind)
    from .blended import BlendedModels

    obj.clusters = BlendedModels(obj.model, obj.sources, n_models=obj.n_clusters)
    obj.clusters.blend(obj.coefficient_rows(obj.cluster_pi_))
    return obj


# ---------------------------------------------------------------------------------------------- AdaWiSE
_ADAWISE_SETTINGS = ("n_evals", "n_init", "warm_start", "seed", "xi", "candidates_per_pass")


def save_adawise(obj, path: str | os.PathLike[str]) -> Path:
    """Writes AdaWiSE's settings and warm-start state (see :meth:`AdaWiSE.save`)."""
    kernel = None
    if obj._kernel is not None:
        kernel = {
            "theta": [float(v) for v in obj._kernel.theta],
            "hyperparameters": [h.name for h in obj._kernel.hyperparameters if not h.fixed],
            "repr": repr(obj._kernel),
        }
    meta = {
        "settings": {**{k: getattr(obj, k) for k in _ADAWISE_SETTINGS}, "grid_size": int(len(obj.grid))},
        "weights": {"theta_zs": weight_record(obj._sources[0]), "theta_ft": weight_record(obj._sources[1])},
        "best_alpha": obj.best_alpha_,
        "kernel": kernel,
        "history": obj.history_,
    }
    return write_saved(path, "AdaWiSE", meta, {})


def load_adawise(cls, path, model, theta_zs, theta_ft):
    """Rebuilds AdaWiSE with its warm-start state (see :meth:`AdaWiSE.load`)."""
    from ..ops.statedict import as_state_dict
    from .adawise import make_gp

    meta, _ = read_saved(path, "AdaWiSE")
    require(meta, {}, "AdaWiSE", ("settings", "weights", "best_alpha", "kernel", "history"))
    zs, ft = as_state_dict(theta_zs, "theta_zs"), as_state_dict(theta_ft, "theta_ft")
    check_weights("theta_zs", meta["weights"]["theta_zs"], zs, "AdaWiSE.load")
    check_weights("theta_ft", meta["weights"]["theta_ft"], ft, "AdaWiSE.load")
    obj = cls(model, zs, ft, **meta["settings"])
    obj.best_alpha_ = meta["best_alpha"]
    obj.history_ = list(meta["history"])
    if meta["kernel"] is not None:
        template = make_gp(None, obj.seed).kernel
        names = [h.name for h in template.hyperparameters if not h.fixed]
        if names != meta["kernel"]["hyperparameters"] or len(meta["kernel"]["theta"]) != len(template.theta):
            raise SavedStateError(
                f"AdaWiSE.load: the saved kernel has hyperparameters {meta['kernel']['hyperparameters']}, "
                f"this version's surrogate has {names}"
            )
        obj._kernel = template.clone_with_theta(np.asarray(meta["kernel"]["theta"], dtype=np.float64))
    return obj
