"""Shared pytest fixtures: devices, seeded generators, small random state dicts, tiny models, thread count."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

# cuDNN convolutions (and, where enabled, cuBLAS matmuls) default to TF32 on Ampere and later, about 1e-3
# relative: the CUDA tests compare against stock convolutions and linears at 1e-5, so they run in full fp32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# The device x dtype table of the op tests (pytorch_scatter keeps its own in testing.py). CUDA is always a
# parameter, skipped with a reason where no GPU is visible, so a CPU-only run reports the CUDA cases it did not
# run instead of silently having fewer of them.
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
#: The dtypes of the ops that read reduced precision and accumulate in fp32 (softmax_entropy,
#: entropy_coefficients, sample_combine, samplewise_linear, samplewise_lora).
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: The dtypes that blend interpolates (dawin_ext.BLENDABLE_DTYPES); every other dtype is copied from source 0.
BLEND_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each test runs on the CPU and, where a GPU is visible, on CUDA."""
    return torch.device(request.param)


@pytest.fixture
def cuda_device() -> torch.device:
    """A CUDA device; the test is skipped where none is visible."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so that failures reproduce."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def make_state_dict(gen) -> Callable[..., dict[str, torch.Tensor]]:
    """Factory for a small random state dict: float weights plus an integer buffer.

    ``make_state_dict(dtype=torch.float32, device="cpu")`` returns keys ``linear.weight`` [4, 3],
    ``linear.bias`` [4], ``norm.weight`` [4] and ``norm.num_batches_tracked`` (int64, 0-d).
    """

    def make(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        shapes = {"linear.weight": (4, 3), "linear.bias": (4,), "norm.weight": (4,)}
        sd = {k: torch.randn(s, generator=gen).to(dtype=dtype, device=device) for k, s in shapes.items()}
        sd["norm.num_batches_tracked"] = torch.tensor(7, device=device)
        return sd

    return make


@pytest.fixture
def tiny_clip() -> Callable[..., tuple]:
    """Factory for a tiny open_clip zero-shot classifier at random init and a "fine-tuned" copy.

    ``tiny_clip(arch, seed, noise)`` returns ``(classifier, theta_zs, theta_ft, gen)``: theta_ft adds
    ``noise`` times each tensor's std of Gaussian noise to theta_zs, and ``gen`` is the seeded generator
    that made it, to draw test inputs from.
    """

    def make(arch: str, seed: int, noise: float):
        from dawin_ext.integrations import openclip

        openclip.register_tiny_configs()
        torch.manual_seed(seed)
        model, _, tok = openclip.create_clip_model(arch)
        classes = ["cat", "dog", "car", "tree", "boat"]
        clf = openclip.CLIPClassifier.from_clip(model, tok, classes, templates="classname")
        zs = {k: v.clone() for k, v in clf.state_dict().items()}
        g = torch.Generator().manual_seed(seed + 1)
        ft = {
            k: (v + noise * v.std().nan_to_num(0.1) * torch.randn(v.shape, generator=g))
            if v.is_floating_point()
            else v.clone()
            for k, v in zs.items()
        }
        return clf, zs, ft, g

    return make


def _single_intra_op_thread() -> Iterator[None]:
    # Tiny models and tiny calls gain nothing from intra-op threads, and on a shared, oversubscribed 2-core
    # machine OpenMP's spinning makes a 1 ms call take most of a second.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for this test, restored afterwards."""
    yield from _single_intra_op_thread()


@pytest.fixture(scope="module")
def one_thread_per_module() -> Iterator[None]:
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    yield from _single_intra_op_thread()


@pytest.fixture
def per_sample(monkeypatch) -> dict:
    """``dawin-ext eval``'s per-sample scores, keyed by the method and set names it reports (eval_setup.py)."""
    from eval_setup import capture_per_sample

    return capture_per_sample(monkeypatch)


def tiny_mlp(seed: int, n_in: int = 8, n_out: int = 6) -> torch.nn.Module:
    """A small Linear-LayerNorm-GELU-Linear classifier, initialised under ``seed``."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Linear(n_in, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, n_out))


def mlp_pair(seed: int = 0, n_samples: int = 120):
    """Two independently initialised :func:`tiny_mlp` as zero-shot and fine-tuned weights, and ``n_samples`` inputs
    of varied scale (so that confidence, hence DaWin's lambda, spreads over (0, 1)) with labels.
    Returns (model holding the zero-shot weights, theta_zs, theta_ft, x, y)."""
    model = tiny_mlp(seed)
    zs = {k: v.clone() for k, v in model.state_dict().items()}
    ft = {k: v.clone() for k, v in tiny_mlp(seed + 1).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(n_samples, 8, generator=g) * torch.rand(n_samples, 1, generator=g).mul(6)
    y = torch.randint(0, 6, (n_samples,), generator=g)
    return model, zs, ft, x, y


def tiny_clip_pair(classnames: list[str], *, seed: int, noise_seed: int, noise: float):
    """The tiny open_clip ViT zero-shot classifier over ``classnames`` (initialised under ``seed``) and a fine-tuned
    stand-in: each floating weight plus ``noise`` times its std of Gaussian noise drawn from a generator seeded
    ``noise_seed``. Returns (classifier, theta_zs, theta_ft, generator), the generator for the caller's inputs."""
    from dawin_ext.integrations import openclip

    openclip.register_tiny_configs()
    torch.manual_seed(seed)
    model, _, tok = openclip.create_clip_model("dawin-tiny-vit")
    clf = openclip.CLIPClassifier.from_clip(model, tok, classnames, templates="classname")
    zs = {k: v.clone() for k, v in clf.state_dict().items()}
    g = torch.Generator().manual_seed(noise_seed)
    ft = {
        k: v + noise * v.std().nan_to_num(0.1) * torch.randn(v.shape, generator=g)
        if v.is_floating_point()
        else v.clone()
        for k, v in zs.items()
    }
    return clf, zs, ft, g


def fit_tiny_dawin(temperatures: tuple[float, float]):
    """A DaWin (offset adjustment, K=3) fitted on the tiny open_clip ViT and a noisy fine-tuned copy, over 40 images
    of varied scale. Returns (dawin, classifier, theta_zs, theta_ft, images)."""
    from dawin_ext import DaWin

    clf, zs, ft, g = tiny_clip_pair(["cat", "dog", "car", "tree", "boat"], seed=3, noise_seed=4, noise=0.3)
    x = torch.randn(40, 3, 32, 32, generator=g) * torch.rand(40, 1, 1, 1, generator=g).mul(3)
    dw = DaWin(clf, zs, ft, temperatures=temperatures, offset_adjustment=True, n_clusters=3, seed=1)
    return dw.fit([x[:20], x[20:]]), clf, zs, ft, x


def perturbed_sources(sd: dict, num: int, seed: int, rel: float = 0.2) -> list[dict]:
    """sd plus num - 1 perturbed copies: noise scaled to each tensor, running variances kept positive."""
    g = torch.Generator().manual_seed(seed)
    out = [sd]
    for _ in range(num - 1):
        new = {}
        for k, v in sd.items():
            if not v.is_floating_point():
                new[k] = v.clone()
            elif k.endswith("running_var"):
                new[k] = v * torch.exp(rel * torch.randn(v.shape, generator=g)).to(v)
            else:
                scale = v.float().std() if v.numel() > 1 else v.float().abs()
                scale = scale if float(scale) > 0 else torch.tensor(0.02)
                new[k] = v + (rel * scale * torch.randn(v.shape, generator=g)).to(v)
        out.append(new)
    return out
