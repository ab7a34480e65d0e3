"""Data for the embedded benchmark: scikit-learn's digits, upscaled, and the distribution shifts.

Every image tensor here is ``[N, 1, S, S]`` float32 in [0, 1] (before normalization). Every random choice is
drawn from an explicit ``torch.Generator``, so a seed fixes the whole data pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DigitsSplits",
    "load_digits_splits",
    "SHIFTS",
    "TEST_SHIFTS",
    "GENERALIST_FAMILIES",
    "apply_shift",
    "generalist_augment",
    "make_test_sets",
]

#: Mean and std used to normalize inputs (a fixed constant, not fit on test data).
PIXEL_MEAN = 0.3
PIXEL_STD = 0.35


@dataclass(frozen=True)
class DigitsSplits:
    """Stratified splits of the 1797 digits, upscaled to ``size``×``size`` in [0, 1]."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    size: int


def load_digits_splits(
    seed: int, size: int = 16, val_fraction: float = 0.15, test_fraction: float = 0.3
) -> DigitsSplits:
    """Loads scikit-learn's digits (shipped with the package, no download) and splits them with a seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    # Upscale 8x8 -> size x size; bilinear keeps strokes smooth so that blur and rotation act like on real images.
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    idx = torch.arange(len(y)).numpy()
    idx_rest, idx_test = train_test_split(idx, test_size=test_fraction, stratify=y.numpy(), random_state=seed)
    idx_train, idx_val = train_test_split(
        idx_rest, test_size=val_fraction / (1.0 - test_fraction), stratify=y.numpy()[idx_rest], random_state=seed
    )
    t = torch.as_tensor
    return DigitsSplits(
        x[t(idx_train)], y[t(idx_train)], x[t(idx_val)], y[t(idx_val)], x[t(idx_test)], y[t(idx_test)], size
    )


def normalize(x: Tensor) -> Tensor:
    """Maps [0, 1] images to the model's input scale."""
    return (x - PIXEL_MEAN) / PIXEL_STD


# --------------------------------------------------------------------------------------------
# Shift families. Each takes images [N,1,S,S] in [0,1], a strength and a generator; returns new images.
# --------------------------------------------------------------------------------------------
def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def rotation(x: Tensor, degrees: float, g: torch.Generator) -> Tensor:
    """Rotation by ±``degrees`` (random sign, magnitude uniform in [0.7, 1] × degrees)."""
    n = x.shape[0]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    ang = sign * _uniform(n, 0.7 * degrees, degrees, g) * math.pi / 180.0
    c, s = torch.cos(ang), torch.sin(ang)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)
    return _affine(x, theta)


def scale_translate(x: Tensor, strength: float, g: torch.Generator) -> Tensor:
    """Zoom out by up to ``strength`` (0.4 means scale 0.6) and shift by up to ``strength`` of the half-width."""
    n = x.shape[0]
    scale = 1.0 - _uniform(n, 0.5 * strength, strength, g)
    # affine_grid maps output to input coordinates, so a zoom-out by s uses 1/s.
    inv = 1.0 / scale
    tx = _uniform(n, -strength, strength, g) * inv
    ty = _uniform(n, -strength, strength, g) * inv
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([inv, zero, tx], 1), torch.stack([zero, inv, ty], 1)], 1)
    return _affine(x, theta)


def gaussian_noise(x: Tensor, sigma: float, g: torch.Generator) -> Tensor:
    """Additive Gaussian pixel noise with standard deviation ``sigma``, clipped to [0, 1]."""
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp_(0.0, 1.0)


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _separable_blur(x: Tensor, sigma: float) -> Tensor:
    k = _gaussian_kernel(sigma)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ky, groups=c)


def blur(x: Tensor, sigma: float, g: torch.Generator) -> Tensor:
    """Gaussian blur with standard deviation ``sigma`` pixels (deterministic; ``g`` unused)."""
    del g
    return _separable_blur(x, sigma)


def contrast_inversion(x: Tensor, strength: float, g: torch.Generator) -> Tensor:
    """Contrast change ``0.5 + c (x - 0.5)`` with ``c = 1 - 2·strength``: strength 1 is full inversion."""
    del g
    c = 1.0 - 2.0 * strength
    return (0.5 + c * (x - 0.5)).clamp_(0.0, 1.0)


def occlusion(x: Tensor, size: float, g: torch.Generator) -> Tensor:
    """One random ``size``×``size`` square per image set to a random grey level."""
    n, _, h, w = x.shape
    s = int(round(size))
    out = x.clone()
    top = torch.randint(0, h - s + 1, (n,), generator=g)
    left = torch.randint(0, w - s + 1, (n,), generator=g)
    level = torch.rand(n, generator=g)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + s).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + s).view(n, 1, 1))
    )
    mask = mask.unsqueeze(1)
    return torch.where(mask, level.view(n, 1, 1, 1).expand_as(out), out)


def elastic(x: Tensor, alpha: float, g: torch.Generator) -> Tensor:
    """Elastic distortion: a random displacement field smoothed with σ=2 px, ``alpha`` pixels in magnitude."""
    n, _, h, w = x.shape
    disp = torch.rand((n, 2, h, w), generator=g) * 2.0 - 1.0
    disp = _separable_blur(disp, 2.0)
    disp = disp / disp.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    # Pixels -> normalized grid units (grid spans 2 over the image width).
    disp = disp * alpha * 2.0 / torch.tensor([w, h], dtype=torch.float32).view(1, 2, 1, 1)
    eye = torch.eye(2, 3).unsqueeze(0).expand(n, 2, 3)
    grid = F.affine_grid(eye, list(x.shape), align_corners=False) + disp.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


ShiftFn = Callable[[Tensor, float, torch.Generator], Tensor]

#: Every shift family by name.
SHIFTS: dict[str, ShiftFn] = {
    "rotation": rotation,
    "scale_translate": scale_translate,
    "gaussian_noise": gaussian_noise,
    "blur": blur,
    "contrast_inversion": contrast_inversion,
    "occlusion": occlusion,
    "elastic": elastic,
}

#: Families and strength ranges seen while "pretraining" the generalist (mixed strengths, drawn per batch).
#: Occlusion and elastic distortion are held out of pretraining too, so two test shifts are new to both models.
GENERALIST_FAMILIES: dict[str, tuple[float, float]] = {
    "rotation": (10.0, 40.0),
    "scale_translate": (0.1, 0.35),
    "gaussian_noise": (0.05, 0.4),
    "blur": (0.5, 1.5),
    "contrast_inversion": (0.6, 1.0),
}

#: The shifted test sets: (name, family, strength). None of these is ever seen by the specialist.
TEST_SHIFTS: list[tuple[str, str, float]] = [
    ("rotation-35", "rotation", 35.0),
    ("scale-translate-0.3", "scale_translate", 0.3),
    ("noise-0.3", "gaussian_noise", 0.3),
    ("blur-1.2", "blur", 1.2),
    ("inverted", "contrast_inversion", 1.0),
    ("occlusion-7px", "occlusion", 7.0),
    ("elastic-2.5px", "elastic", 2.5),
]


def apply_shift(x: Tensor, family: str, strength: float, g: torch.Generator) -> Tensor:
    """Applies the named shift family at ``strength``."""
    if family not in SHIFTS:
        raise KeyError(f"unknown shift family {family!r}; known: {sorted(SHIFTS)}")
    return SHIFTS[family](x, float(strength), g)


def generalist_augment(x: Tensor, g: torch.Generator, clean_fraction: float = 0.2) -> Tensor:
    """The generalist's broad training distribution: each image gets one or two random families at random strengths.

    A ``clean_fraction`` of the images is left untouched.
    """
    n = x.shape[0]
    out = x.clone()
    names = list(GENERALIST_FAMILIES)
    for _round in range(2):
        choice = torch.randint(0, len(names), (n,), generator=g)
        # The second round touches only half of the images.
        active = torch.rand(n, generator=g) >= (clean_fraction if _round == 0 else 0.5)
        for f, name in enumerate(names):
            sel = torch.nonzero(active & (choice == f)).flatten()
            if sel.numel() == 0:
                continue
            low, high = GENERALIST_FAMILIES[name]
            strength = low + (high - low) * float(torch.rand((), generator=g))
            out[sel] = apply_shift(out[sel], name, strength, g)
    return out


def make_test_sets(x: Tensor, y: Tensor, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The ID test set plus one shifted copy of it per :data:`TEST_SHIFTS` entry (seeded per shift)."""
    sets = {"ID": (x, y)}
    for i, (name, family, strength) in enumerate(TEST_SHIFTS):
        g = torch.Generator().manual_seed(seed * 1000 + 17 + i)
        sets[name] = (apply_shift(x, family, strength, g), y)
    return sets
