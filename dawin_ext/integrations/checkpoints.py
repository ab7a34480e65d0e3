"""Loading and saving checkpoints safely: safetensors, or ``torch.load(weights_only=True)``.

A pickle can run arbitrary code while it is being loaded. dawin-ext therefore never unpickles anything beyond
tensors and plain containers unless the caller passes ``trust_pickle=True`` (``--trust-pickle`` on the command
line), which says in so many words that they trust the file's origin.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..ops.statedict import StateDict

__all__ = ["UnsafeCheckpointError", "CheckpointFormatError", "load_state_dict", "save_state_dict"]

#: Keys under which training scripts commonly nest the weights, tried in this order.
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")
#: Key prefixes added by wrappers (DataParallel/DDP, torch.compile); stripped when every key has them.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_SAFETENSORS_SUFFIXES = (".safetensors",)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint is a pickle that needs arbitrary code to load, and the caller did not allow that."""


class CheckpointFormatError(ValueError):
    """A checkpoint file could be read but does not hold a state dict in a layout dawin-ext understands."""


def _refusal_message(path: Path, err: BaseException) -> str:
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([^\s]+)", text)
    if found:
        reason = f"it references {found.group(1)!r}, so loading it needs arbitrary code"
    else:
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = detail.group(1).strip() if detail else "it is not a plain tensor pickle"
    return (
        f"refusing to load {str(path)!r}: torch.load(weights_only=True), which only unpickles tensors and plain "
        f"containers, rejected it ({reason}). Unpickling it anyway can execute arbitrary code from the file. "
        "Saved nn.Module objects (torch.save(model)) are such pickles. Safer: re-save the weights as a state dict, "
        "ideally with dawin_ext.save_state_dict('weights.safetensors', model.state_dict()). If you trust the file's "
        "origin, allow it deliberately with load_state_dict(..., trust_pickle=True) or `--trust-pickle` on the "
        "command line; that runs torch.load(weights_only=False), which can execute arbitrary code."
    )


def _sniff(path: Path) -> str:
    """'torch' (zip archive or protocol>=2 pickle), 'safetensors' (8-byte header size then a JSON header) or ''."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return ""


def _read(path: Path, map_location: str | torch.device, trust_pickle: bool) -> object:
    kind = _sniff(path)
    if kind == "safetensors" or (not kind and path.suffix.lower() in _SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except SafetensorError as e:
            raise CheckpointFormatError(f"{str(path)!r} is not a valid safetensors file: {e}") from e
    if not kind:
        raise CheckpointFormatError(
            f"{str(path)!r} is neither a torch checkpoint (zip archive or pickle) nor a safetensors file"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise CheckpointFormatError(f"{str(path)!r} could not be unpickled: {e}") from e
        if "Weights only load failed" in str(e):
            raise UnsafeCheckpointError(_refusal_message(path, e)) from e
        raise CheckpointFormatError(f"{str(path)!r} is not a readable torch checkpoint: {e}") from e
    except Exception as e:  # torch raises KeyError, RuntimeError, EOFError... for damaged files
        raise CheckpointFormatError(f"{str(path)!r} is not a readable torch checkpoint: {e}") from e


def _unwrap(obj: object, path: Path) -> StateDict:
    if isinstance(obj, nn.Module):  # only reachable with trust_pickle=True
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a state dict (a mapping of parameter names to tensors)"
        )
    if not all(isinstance(v, Tensor) for v in obj.values()):
        for key in NESTED_STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, Mapping) and inner:
                return _unwrap(inner, path)
    if not obj:
        raise CheckpointFormatError(f"{str(path)!r} holds an empty state dict")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"{str(path)!r}: key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, Tensor):
            nested = ", ".join(repr(k) for k in NESTED_STATE_DICT_KEYS)
            raise CheckpointFormatError(
                f"{str(path)!r}: entry {key!r} is a {type(value).__name__}, not a tensor, and the file has no "
                f"nested state dict under any of {nested}"
            )
    sd = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_state_dict(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    trust_pickle: bool = False,
) -> StateDict:
    """Loads a ``{name: tensor}`` state dict from ``path``.

    safetensors files (recognised by content, or by a ``.safetensors`` suffix) are read with
    :mod:`safetensors.torch`; torch checkpoints (zip archives or pickles) with ``torch.load(weights_only=True)``, which unpickles only tensors and plain containers. A pickle that needs
    arbitrary code (for example a whole ``nn.Module`` saved with ``torch.save(model)``) raises
    :class:`UnsafeCheckpointError` *before* any of that code runs, unless ``trust_pickle=True``: that switches to
    ``torch.load(weights_only=False)``, which **can execute arbitrary code** from the file, so pass it only for
    files whose origin you trust.

    Accepted layouts: a flat state dict; one nested under ``"state_dict"``, ``"model_state_dict"``, ``"model"`` or
    ``"module"`` (other entries such as ``"epoch"`` or ``"optimizer"`` are ignored); with ``trust_pickle``, a saved
    module. A ``"module."`` (DataParallel/DDP) or ``"_orig_mod."`` (torch.compile) prefix shared by every key is
    stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        UnsafeCheckpointError: the file needs arbitrary code to load and ``trust_pickle`` is False.
        CheckpointFormatError: the file is unreadable or holds no state dict (the message names the offending entry).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a file")
    return _unwrap(_read(path, map_location, trust_pickle), path)


def save_state_dict(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, Tensor] | nn.Module,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Saves a state dict (or a module's) to ``path``; returns the path.

    ``*.safetensors`` paths are written with :mod:`safetensors.torch` (tensors are moved to the CPU, made
    contiguous, and copies are made of tensors that share memory, so the caller's tensors are untouched);
    ``metadata`` is stored in the safetensors header. Any other suffix is written with ``torch.save`` as a plain
    dict of tensors, which ``torch.load(weights_only=True)`` reads back.
    """
    path = Path(path)
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"save_state_dict: expected a mapping of str to Tensor or an nn.Module, got {type(state_dict)}")
    if not state_dict:
        raise ValueError(f"save_state_dict: refusing to write an empty state dict to {str(path)!r}")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"save_state_dict: key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, Tensor):
            raise TypeError(f"save_state_dict: entry {key!r} is a {type(value).__name__}, not a tensor")
    if path.suffix.lower() in _SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("save_state_dict: safetensors metadata must map str to str")
        out: dict[str, Tensor] = {}
        seen: set[tuple[int, int]] = set()
        for key, value in state_dict.items():
            t = value.detach().cpu().contiguous()
            ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            # safetensors refuses tensors that share storage (tied weights, views): store each as its own copy.
            if t.numel() and ident in seen:
                t = t.clone()
            seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
            out[key] = t
        save_file(out, str(path), metadata=dict(metadata) if metadata is not None else None)
    else:
        if metadata is not None:
            raise ValueError("save_state_dict: metadata is only stored in .safetensors files")
        torch.save({k: v.detach() for k, v in state_dict.items()}, path)
    return path
