"""Training the generalist ("pretrained") and the specialist ("fine-tuned"), with an on-disk checkpoint cache.

The specialist starts from the generalist's weights, so the two are the linear-mode-connected pair that
weight interpolation needs. A cache entry is keyed by a hash of everything that determines the weights
(config, seed, data split, torch version), so a second run with the same settings skips training.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DigitsSplits, generalist_augment, normalize
from .model import SmallCNN, build_model

__all__ = ["TrainConfig", "TrainedPair", "default_cache_dir", "train_pair", "load_state_dict_file"]

# Bump when the training code changes in a way that changes the weights, so that stale caches are not reused.
_TRAINING_CODE_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the two checkpoints, besides the data split (``seed``, ``image_size``)."""

    seed: int = 0
    image_size: int = 16
    width: int = 16
    generalist_epochs: int = 12
    generalist_lr: float = 1e-2
    specialist_epochs: int = 15
    specialist_lr: float = 5e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    # Train on only the first n training images (None: all); the reduced test benchmark uses this.
    train_subset: int | None = None

    def key(self) -> str:
        """Cache key: the config plus the versions that can change the data split or the arithmetic."""
        import sklearn

        blob = json.dumps(
            {
                "config": asdict(self),
                "code": _TRAINING_CODE_VERSION,
                "torch": torch.__version__,
                "sklearn": sklearn.__version__,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrainedPair:
    """The two trained models (eval mode) and where their checkpoints live."""

    generalist: SmallCNN
    specialist: SmallCNN
    generalist_path: Path
    specialist_path: Path
    from_cache: bool
    train_seconds: float


def default_cache_dir() -> Path:
    """``$DAWIN_EXT_CACHE`` or ``$XDG_CACHE_HOME/dawin_ext`` (``~/.cache/dawin_ext``), plus ``/demo``."""
    root = os.environ.get("DAWIN_EXT_CACHE")
    if root:
        return Path(root) / "demo"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dawin_ext" / "demo"


def _fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    lr: float,
    cfg: TrainConfig,
    augment: bool,
    generator_seed: int,
) -> nn.Module:
    g = torch.Generator().manual_seed(generator_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(y) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    model.train()
    for _epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            xb = x[idx]
            if augment:
                xb = generalist_augment(xb, g)
            loss = F.cross_entropy(model(normalize(xb)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def _train_both(generalist: nn.Module, specialist: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig) -> None:
    with torch.random.fork_rng(devices=[]):
        # The model has no dropout, but seed the global RNG anyway so that any stray randomness is reproducible.
        torch.manual_seed(cfg.seed)
        _fit(generalist, x, y, cfg.generalist_epochs, cfg.generalist_lr, cfg, True, cfg.seed * 7919 + 1)
        # The specialist starts from the generalist's weights (and running statistics).
        specialist.load_state_dict(generalist.state_dict())
        _fit(specialist, x, y, cfg.specialist_epochs, cfg.specialist_lr, cfg, False, cfg.seed * 7919 + 2)


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Reads a checkpoint written by :func:`train_pair` (safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def train_pair(
    data: DigitsSplits, cfg: TrainConfig, cache_dir: Path | None = None, retrain: bool = False
) -> TrainedPair:
    """Returns the generalist and the specialist, from the cache when present, else trained and cached.

    The generalist is trained from scratch on :func:`generalist_augment`'s broad distribution; the specialist is
    its copy fine-tuned on the clean training images only.
    """
    from safetensors.torch import save_file

    if data.size != cfg.image_size:
        raise ValueError(f"train_pair: data has image size {data.size} but the config says {cfg.image_size}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = cache / cfg.key()
    gen_path, spec_path, meta_path = (
        entry / "generalist.safetensors",
        entry / "specialist.safetensors",
        entry / "meta.json",
    )
    generalist = build_model(cfg.width, seed=cfg.seed)
    specialist = build_model(cfg.width, seed=cfg.seed)
    if not retrain and gen_path.is_file() and spec_path.is_file() and meta_path.is_file():
        generalist.load_state_dict(load_state_dict_file(gen_path))
        specialist.load_state_dict(load_state_dict_file(spec_path))
        meta = json.loads(meta_path.read_text())
        return TrainedPair(
            generalist.eval(), specialist.eval(), gen_path, spec_path, True, float(meta["train_seconds"])
        )

    x, y = data.x_train, data.y_train
    if cfg.train_subset is not None:
        x, y = x[: cfg.train_subset], y[: cfg.train_subset]
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # One thread: the weights must not depend on the caller's thread count (reduction order), and the tiny
    # model trains fastest single-threaded anyway.
    torch.set_num_threads(1)
    try:
        _train_both(generalist, specialist, x, y, cfg)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    entry.mkdir(parents=True, exist_ok=True)
    # Write to temporary names first so an interrupted run never leaves a half-written cache entry.
    for model, path in ((generalist, gen_path), (specialist, spec_path)):
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)
    meta_path.write_text(json.dumps({"config": asdict(cfg), "train_seconds": seconds}, indent=2))
    return TrainedPair(generalist, specialist, gen_path, spec_path, False, seconds)
