"""Evaluation across processes with ``torch.distributed``: exact sharding, ordered gathers, loud failures.

dawin-ext scales out on PyTorch's own engine: processes started by ``torchrun`` (or ``srun``), one process group,
NCCL on GPUs and gloo on CPUs. This module holds the small pieces that make a distributed run give the same numbers
as one process:

* :func:`active_group` finds the process group to work in (the one passed, else the default group if one is
  initialised, else none: single-process behaviour).
* :func:`shard_range` / :class:`ShardSampler` split ``n`` samples into contiguous per-rank shards, without padding
  or duplicates. With ``block=batch_size`` the shard boundaries fall on batch boundaries, so every rank sees exactly
  the batches one process would see: models see the same inputs in the same batches and give the same bits.
* :func:`all_gather_rows` gathers tensors with a different number of rows per rank, in rank order. Concatenating
  contiguous shards in rank order restores the global sample order.
* :func:`run_on_rank0` computes a global result once, on rank 0, and broadcasts it (or rank 0's error), so every rank
  holds the identical object even on nodes whose CPUs round differently.
* :func:`raise_if_any_failed` is the agreement step before a collective: if a rank failed locally, every rank
  raises (the failing rank its own error, the others :class:`RankFailedError` naming that rank and its message)
  instead of leaving the healthy ranks waiting in a collective.
* :func:`atomic_write_text` (temporary file + ``os.replace``), :func:`barrier` (with a timeout),
  :class:`GlobalProgress` (one tqdm bar on rank 0 counting the samples of all ranks) and :func:`init_from_env`
  (the process group of a ``torchrun`` launch).

Time spent inside the collectives of this module (waiting for the slowest rank included) is accumulated in
:func:`comm_seconds`, for the scaling benchmark.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "RankFailedError",
    "active_group",
    "rank_and_world",
    "shard_range",
    "ShardSampler",
    "all_gather_rows",
    "all_gather_objects",
    "raise_if_any_failed",
    "run_on_rank0",
    "all_sum_int",
    "barrier",
    "atomic_write_text",
    "init_from_env",
    "GlobalProgress",
    "comm_seconds",
    "reset_comm_seconds",
]

T = TypeVar("T")
Group = Any  # torch.distributed.ProcessGroup; typed loosely so that this module imports without dist support


class RankFailedError(RuntimeError):
    """Another rank failed; carries that rank and its error message (raised on the healthy ranks)."""

    def __init__(self, what: str, rank: int, error_type: str, message: str) -> None:
        super().__init__(f"{what}: rank {rank} failed: {error_type}: {message}")
        self.rank, self.error_type, self.message = rank, error_type, message


# ------------------------------------------------------------------------------------------------ group, shards
def active_group(group: Group | None | bool = None) -> Group | None:
    """The process group to work in.

    ``group`` itself if given; ``None`` detects: the default (WORLD) group if one is initialised, else ``None``
    (single-process behaviour); ``False`` forces single-process behaviour even inside an initialised group. A
    group of world size 1 is still a group: the distributed code path runs (this is what an NCCL smoke run on one
    GPU exercises).
    """
    if group is False:
        return None
    if group is not None and group is not True:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("a process group was passed but torch.distributed is not initialised")
        return group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    if group is True:
        raise RuntimeError("group=True asks for a process group, but torch.distributed is not initialised")
    return None


def rank_and_world(group: Group | None) -> tuple[int, int]:
    """(rank in ``group``, its size); (0, 1) without a group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(n: int, rank: int, world_size: int, block: int = 1) -> tuple[int, int]:
    """Rank ``rank``'s contiguous shard ``[start, stop)`` of ``n`` samples: no padding, no duplicates.

    The ``ceil(n / block)`` blocks (the last one may be short) are dealt out contiguously and as evenly as
    possible: rank r gets blocks ``[r * nb // W, (r + 1) * nb // W)``. With ``block = batch_size`` every shard
    starts on a batch boundary, so each rank's loader yields exactly the batches a single process would.
    A rank may get an empty shard when there are fewer blocks than ranks.
    """
    if n < 0 or world_size < 1 or block < 1:
        raise ValueError(f"shard_range: need n >= 0, world_size >= 1, block >= 1; got {n}, {world_size}, {block}")
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_range: rank {rank} is outside [0, {world_size})")
    n_blocks = -(-n // block)
    b0, b1 = rank * n_blocks // world_size, (rank + 1) * n_blocks // world_size
    return min(b0 * block, n), min(b1 * block, n)


class ShardSampler(torch.utils.data.Sampler[int]):
    """Sampler over this rank's contiguous shard (see :func:`shard_range`); every sample belongs to exactly one rank.

    Unlike ``DistributedSampler`` it neither pads nor strides: accuracies summed over ranks are exact, and the
    global order is the ranks' outputs concatenated in rank order. Give ``block=batch_size`` (and the same batch
    size to the DataLoader) for batches identical to a single process's.

    Args:
        data: a sized dataset, or the number of samples.
        group: process group (default: the initialised default group); or give ``rank`` and ``world_size``.
        block: shard boundaries are multiples of this (use the loader's batch size).
    """

    def __init__(
        self,
        data: Any,
        *,
        group: Group | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        block: int = 1,
    ) -> None:
        n = data if isinstance(data, int) else len(data)
        if (rank is None) != (world_size is None):
            raise ValueError("ShardSampler: give both rank and world_size, or neither")
        if rank is None:
            rank, world_size = rank_and_world(active_group(group))
        self.n, self.rank, self.world_size, self.block = int(n), int(rank), int(world_size), int(block)
        self.start, self.stop = shard_range(self.n, self.rank, self.world_size, self.block)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


# ------------------------------------------------------------------------------------------------ communication
_COMM = {"seconds": 0.0, "calls": 0}


def comm_seconds() -> float:
    """Seconds spent in this module's collectives since the last reset (waiting for other ranks included)."""
    return _COMM["seconds"]


def reset_comm_seconds() -> None:
    _COMM["seconds"], _COMM["calls"] = 0.0, 0


@contextlib.contextmanager
def _timed() -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        _COMM["seconds"] += time.perf_counter() - start
        _COMM["calls"] += 1


def _comm_device(group: Group) -> torch.device:
    """Where collective buffers must live: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any, group: Group) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (small objects only: it pickles)."""
    out: list[Any] = [None] * dist.get_world_size(group)
    with _timed():
        dist.all_gather_object(out, obj, group=group)
    return out


def all_gather_rows(t: Tensor | None, group: Group, what: str) -> tuple[Tensor, list[int]]:
    """Concatenates every rank's rows in rank order; returns (global tensor, rows per rank).

    ``t`` is ``[n_r, ...]``; ranks may hold different ``n_r``. A rank without samples passes ``None`` (or a
    tensor with 0 rows): it contributes nothing, and the trailing shape comes from the others. Trailing shapes
    and dtypes must agree (checked on every rank, so every rank raises the same error). The rows travel
    unchanged (no reduction), so the result is bit-identical on every rank; it is returned on ``t``'s device
    (the CPU for a rank without samples).
    """
    n_local = 0 if t is None else int(t.shape[0])
    meta = (n_local, None if n_local == 0 else (tuple(t.shape[1:]), str(t.dtype).removeprefix("torch.")))
    metas = all_gather_objects(meta, group)
    counts = [int(m[0]) for m in metas]
    known = [(r, m[1]) for r, m in enumerate(metas) if m[1] is not None]
    if not known:
        raise ValueError(f"{what}: no rank has any samples")
    r0, (trailing, dtype_name) = known[0]
    for r, m in known[1:]:
        if m != (trailing, dtype_name):
            raise ValueError(
                f"{what}: rank {r} has rows of shape {list(m[0])} and dtype {m[1]}, but rank {r0} has "
                f"{list(trailing)} and {dtype_name}"
            )
    dtype = getattr(torch, dtype_name)
    device = _comm_device(group)
    buf = torch.zeros((max(counts), *trailing), dtype=dtype, device=device)
    if n_local:
        buf[:n_local] = t.to(device)
    parts = [torch.empty_like(buf) for _ in counts]
    with _timed():
        dist.all_gather(parts, buf, group=group)
    out = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
    return out.to(t.device if t is not None else "cpu"), counts


def raise_if_any_failed(error: BaseException | None, group: Group, what: str, info: Any = None) -> list[Any]:
    """Agreement step (a collective every rank must call): raises on every rank if any rank failed, else returns
    every rank's small picklable ``info`` in rank order.

    The failing rank re-raises its own ``error``; the others raise :class:`RankFailedError` naming the first failed
    rank and its message. Call it after each local phase that can fail and before the next collective, so that a
    local error never leaves the other ranks waiting in a collective.
    """
    status = None if error is None else (type(error).__name__, str(error))
    gathered = all_gather_objects((status, info), group)
    failed = [(r, s) for r, (s, _) in enumerate(gathered) if s is not None]
    if not failed:
        return [i for _, i in gathered]
    if error is not None:
        raise error
    r, (name, message) = failed[0]
    raise RankFailedError(what, r, name, message)


def capture(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """(fn(), None), or (None, the exception) -- to be followed by :func:`raise_if_any_failed`."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001  (handed to raise_if_any_failed, which re-raises it)
        return None, e


def run_on_rank0(fn: Callable[[], T], group: Group, what: str) -> T:
    """Runs ``fn`` on rank 0 only and broadcasts its result (pickled) to every rank; rank 0's error is raised on
    every rank (as itself on rank 0, as :class:`RankFailedError` elsewhere).

    For global computations (a mixture fit, statistics over the whole set): one computation, so every rank holds
    the identical result, even across nodes whose floating-point libraries differ.
    """
    rank = dist.get_rank(group)
    payload: list[Any] = [None]
    error = None
    if rank == 0:
        result, error = capture(fn)
        payload[0] = ("ok", result) if error is None else ("error", (type(error).__name__, str(error)))
    with _timed():
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    kind, value = payload[0]
    if kind == "ok":
        return value
    if error is not None:
        raise error
    raise RankFailedError(what, 0, value[0], value[1])


def all_sum_int(values: Sequence[int], group: Group) -> list[int]:
    """Element-wise sums of integer counts over ranks (exact: int64)."""
    t = torch.tensor(list(values), dtype=torch.int64, device=_comm_device(group))
    with _timed():
        dist.all_reduce(t, group=group)
    return [int(v) for v in t.cpu()]


def barrier(group: Group, timeout_s: float | None = None) -> None:
    """A barrier that cannot hang: gloo's ``monitored_barrier`` names the ranks that did not arrive within
    ``timeout_s``; other backends use the process group's own timeout."""
    with _timed():
        if dist.get_backend(group) == "gloo":
            timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
            dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
        elif dist.get_backend(group) == "nccl":
            dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=group)


# ------------------------------------------------------------------------------------------------ files, launch
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see the old file or the new one, never a part of it:
    a temporary file in the same folder, flushed and fsynced, then ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group to join (``torchrun``, or RANK/WORLD_SIZE set by hand)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: torch.device, timeout_s: float) -> tuple[Group | None, torch.device, bool]:
    """Joins the process group a ``torchrun`` launch describes; returns (group, device, whether it was created here).

    Without the launch variables (and no group initialised) it returns ``(None, device, False)``. On a CUDA
    ``device`` without an index each process takes ``cuda:LOCAL_RANK`` and the backend is NCCL; on the CPU it is
    gloo. Collectives that wait longer than ``timeout_s`` fail instead of hanging.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD, device, False
    if not launched_by_torchrun():
        return None, device, False
    if not dist.is_available():
        raise RuntimeError(
            "the environment asks for torch.distributed, but this torch build has no distributed support"
        )
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD, device, True


# ------------------------------------------------------------------------------------------------ progress
class GlobalProgress:
    """One tqdm bar, on rank 0, counting the samples of all ranks.

    Every rank adds its batch sizes to a counter in the process group's key-value store (one small, non-blocking
    round trip per batch; no collective, so a slow rank never stalls the others); rank 0 shows the running total.
    Without a group it is an ordinary bar. ``enabled`` must be the same on every rank.
    """

    _seq = 0

    def __init__(self, total: int, desc: str, enabled: bool, group: Group | None) -> None:
        self.enabled, self.group = enabled, group
        self.rank = rank_and_world(group)[0]
        self.bar = None
        self.store = None
        GlobalProgress._seq += 1  # the same sequence on every rank: bars are created in the same order
        self.key = f"dawin_ext/progress/{GlobalProgress._seq}"
        if not enabled:
            return
        if group is not None:
            from torch.distributed.distributed_c10d import _get_default_store

            self.store = _get_default_store()
        if self.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, unit="img")

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        done = self.store.add(self.key, int(n)) if self.store is not None else None
        if self.bar is not None:
            self.bar.update((done - self.bar.n) if done is not None else n)

    def wrap(self, loader: Iterable) -> Iterator:
        """Yields ``loader``'s batches, counting each one's samples once it has been processed."""
        from .inference import split_batch

        try:
            for batch in loader:
                yield batch
                self.update(int(split_batch(batch)[0].shape[0]))
        finally:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def tensor_digest(t: Tensor) -> str:
    """A short hash of a tensor's bytes (to check that ranks hold identical results)."""
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ DaWin across ranks
# What is global and what is per rank (DaWin and DaWinMultiTask):
#   per rank  -- the expensive part: the experts' forward passes over the rank's shard, their logits and per-sample
#                entropies (row-wise, so the same bits as in one process when the batches are the same);
#   global    -- the per-sample entropies are gathered in global order ([M, N] floats, 4 bytes per model and
#                sample); on rank 0 they give lambda (or pi), the offset statistics (b, w) over the whole set, the
#                mixture fit and every sample's cluster, with the very code and shapes one process uses; the result
#                is broadcast, so every rank holds identical coefficients, assignments and cluster coefficients;
#   per rank  -- the K cluster models are blended on every rank from the identical cluster coefficients, and
#                routing and the exact mode run on the rank's own shard.
# Expertise metrics other than entropy-based ones (cross-entropy ratio, max-logit ratio) gather the experts' logits
# [N, C] instead and run the single-process coefficient code on rank 0.

_ENTROPY_BASED = ("entropy", "selective", "output_ensemble")


def _collect_local(models, loader, names, device, progress: GlobalProgress | None):
    """collect_logits over this rank's shard; an empty shard gives ``None`` instead of an error."""
    from .inference import collect_logits

    state = {"batches": 0, "exhausted": False}

    def counted():
        for batch in loader if progress is None else progress.wrap(loader):
            state["batches"] += 1
            yield batch
        state["exhausted"] = True

    try:
        return collect_logits(models, counted(), names=names, device=device)
    except ValueError:
        # Only a loader that ran to its end without a batch is an empty shard; an error while fetching the
        # first batch (a corrupt image) is an error.
        if state["exhausted"] and state["batches"] == 0:
            return None
        raise


def _shard_info(counts: list[int], rank: int) -> tuple[int, int]:
    start = sum(counts[:rank])
    return start, start + counts[rank]


def fitted_shard(fitted: Any, group: Group | None | bool, what: str) -> tuple[int, int]:
    """``[start, stop)`` of this rank's samples in the fit order: the whole set after a single-process fit.

    Refuses to predict in a process group of another size than the fit's (the stored coefficients would not
    line up with the rank's shard)."""
    shard = getattr(fitted, "shard_", None)
    pg = active_group(group)
    world = rank_and_world(pg)[1]
    fit_world = len(fitted.rank_samples_) if shard is not None else 1
    if pg is not None and world != fit_world:
        raise RuntimeError(
            f"{what}: fit ran on {fit_world} process(es) but this call runs in a group of {world}; call fit in the "
            "same group (each rank with its shard), or pass group=False to both"
        )
    return shard if shard is not None else (0, fitted.n_samples_)


def fit_dawin(dw: Any, loader: Iterable, group: Group, progress: bool = False) -> Any:
    """``DaWin.fit`` across the ranks of ``group`` (see the comment above for what is global)."""
    from ..ops import entropy_coefficients
    from ..ops.wrappers import coefficients_from_entropies
    from .blended import BlendedModels
    from .dawin import _offset_stats
    from .inference import check_logits_finite
    from .mixture import BetaMixture

    what = "DaWin.fit"
    rank, _ = rank_and_world(group)
    names = ["zero-shot model", "fine-tuned model", "merged model"][: len(dw.experts)]
    bar = GlobalProgress(None, "DaWin fit", True, group) if progress else None
    entropy_based = dw.expertise in _ENTROPY_BASED

    def local():
        got = _collect_local(dw.experts.models, loader, names, dw.device, bar)
        if got is None:
            return None, None, None
        logits, labels = got
        for z, name in zip(logits, names, strict=True):
            check_logits_finite(z, name)
        h = entropy_coefficients(torch.stack(logits[:2]), dw.temperatures, False).entropies if entropy_based else None
        return logits, labels, h

    value, error = capture(local)
    logits, labels, h = value if value is not None else (None, None, None)
    info = None if logits is None else (int(logits[0].shape[0]), int(logits[0].shape[1]), labels is not None)
    infos = raise_if_any_failed(error, group, what, info)
    counts = [0 if i is None else i[0] for i in infos]
    n_classes = {i[1] for i in infos if i is not None}
    if not n_classes:
        raise ValueError(f"{what}: the loaders of all ranks yielded no samples")
    if len(n_classes) > 1:
        raise ValueError(f"{what}: ranks disagree on the number of classes: {[i and i[1] for i in infos]}")
    with_labels = {i[2] for i in infos if i is not None}
    if len(with_labels) > 1:
        raise ValueError(f"{what}: some ranks' loaders carry labels and others do not")
    (c,) = n_classes

    if entropy_based:
        h_all, _ = all_gather_rows(None if h is None else h.t(), group, what)
        h_all = h_all.t().contiguous()

        def global_fit():
            n = h_all.shape[1]
            if dw.offset_adjustment and n < 2:
                raise ValueError(
                    f"DaWin: the offset adjustment needs at least 2 samples (it uses entropy statistics), got {n}"
                )
            coef = coefficients_from_entropies(h_all, dw.offset_adjustment)
            h_zs, h_ft = h_all[0], h_all[1]
            if dw.expertise == "selective":
                return _global_mixture(dw, (h_zs > h_ft).float(), None, BetaMixture)
            offset = _offset_stats(h_zs, h_ft) if dw.offset_adjustment else None
            return _global_mixture(dw, coef[:, 1].contiguous(), offset, BetaMixture)

    else:
        gathered = [all_gather_rows(z, group, what)[0] for z in (logits or [None] * len(dw.experts))]
        y_all = all_gather_rows(labels, group, what)[0] if with_labels == {True} else None

        def global_fit():
            lam, offset = dw._coefficients(gathered, y_all, True if dw.offset_adjustment else None)
            return _global_mixture(dw, lam, offset, BetaMixture)

    result = run_on_rank0(global_fit, group, what)
    dw.coefficients_ = result["lambda"]
    dw.offset_ = result["offset"]
    if logits is None:
        logits = [torch.empty(0, c) for _ in names]
    dw.logits_ = (logits[0], logits[1])
    dw.fit_labels_ = labels
    dw.n_samples_ = int(result["lambda"].shape[0])
    dw.shard_ = _shard_info(counts, rank)
    dw.rank_samples_ = counts
    if dw.weight_space:
        dw.mixture_ = result["mixture"]
        dw.labels_ = result["labels"]
        dw.cluster_coefficients_ = result["means"]
        if dw.clusters is None:
            dw.clusters = BlendedModels(dw.model, [dw.theta_zs, dw.theta_ft], n_models=dw.n_clusters)
        m = dw.cluster_coefficients_
        dw.clusters.blend(torch.stack([1.0 - m, m], dim=1))
    return dw


def _global_mixture(dw: Any, lam: Tensor, offset, mixture_cls) -> dict:
    """Rank 0's share of the fit: the mixture over all lambdas (the same calls as ``DaWin.fit``)."""
    out = {"lambda": lam, "offset": offset}
    if dw.weight_space:
        mixture = mixture_cls(n_components=dw.n_clusters, seed=dw.seed).fit(lam.numpy())
        out["mixture"] = mixture
        out["labels"] = torch.from_numpy(mixture.predict(lam.numpy()))
        out["means"] = torch.from_numpy(mixture.means_.copy())
    return out


def fit_multitask(mt: Any, loader: Iterable, group: Group, progress: bool = False) -> Any:
    """``DaWinMultiTask.fit`` across the ranks of ``group``: per-rank task entropies, gathered; pi, the Dirichlet
    mixture and the assignments on rank 0, broadcast; cluster models blended on every rank."""
    from ..ops import entropy_coefficients
    from ..ops.wrappers import coefficients_from_entropies
    from .blended import BlendedModels
    from .inference import check_logits_finite
    from .mixture import DirichletMixture

    what = "DaWinMultiTask.fit"
    rank, _ = rank_and_world(group)
    names = [f"task model {t}" for t in range(mt.n_tasks)]
    bar = GlobalProgress(None, "DaWinMultiTask fit", True, group) if progress else None

    def local():
        got = _collect_local(mt._task_heads(), loader, names, mt.device, bar)
        if got is None:
            return None
        logits, _ = got
        shapes = {tuple(z.shape) for z in logits}
        if len(shapes) != 1:
            raise ValueError(f"DaWinMultiTask: task models' logits have different shapes {sorted(shapes)}")
        for t, z in enumerate(logits):
            check_logits_finite(z, f"task model {t}")
        return entropy_coefficients(torch.stack([z.float() for z in logits])).entropies, int(logits[0].shape[1])

    value, error = capture(local)
    h, n_out = value if value is not None else (None, None)
    infos = raise_if_any_failed(error, group, what, None if h is None else (int(h.shape[1]), n_out))
    counts = [0 if i is None else i[0] for i in infos]
    widths = {i[1] for i in infos if i is not None}
    if len(widths) > 1:
        raise ValueError(f"{what}: ranks disagree on the number of outputs: {[i and i[1] for i in infos]}")
    h_all, _ = all_gather_rows(None if h is None else h.t(), group, what)
    h_all = h_all.t().contiguous()

    def global_fit():
        pi = coefficients_from_entropies(h_all, False)
        mixture = DirichletMixture(n_components=mt.n_clusters, seed=mt.seed).fit(pi.double().numpy())
        return {
            "pi": pi,
            "mixture": mixture,
            "labels": torch.from_numpy(mixture.predict(pi.double().numpy())),
            "cluster_pi": torch.from_numpy(mixture.params_.copy()),
        }

    result = run_on_rank0(global_fit, group, what)
    mt.pi_, mt.mixture_, mt.labels_, mt.cluster_pi_ = (
        result["pi"],
        result["mixture"],
        result["labels"],
        result["cluster_pi"],
    )
    mt.n_samples_ = int(mt.pi_.shape[0])
    mt.n_outputs_ = widths.pop() if widths else 0
    mt.shard_ = _shard_info(counts, rank)
    mt.rank_samples_ = counts
    if mt.clusters is None:
        mt.clusters = BlendedModels(mt.model, mt.sources, n_models=mt.n_clusters)
    mt.clusters.blend(mt.coefficient_rows(mt.cluster_pi_))
    return mt
