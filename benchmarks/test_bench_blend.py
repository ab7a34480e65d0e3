"""pytest-benchmark suite: blend of the open_clip ViT-B-32 state dict into K = 3 models, against the references.

Run: python -m pytest benchmarks/test_bench_blend.py --benchmark-only --benchmark-group-by=group
Each group holds dawin_ext and its reference, measured in the same run:
  * "new outputs": dawin_ext.blend allocating its outputs vs the reference dict comprehension
    (K calls of the reference interpolation);
  * "out=": dawin_ext.blend writing into existing tensors vs the comprehension and vs per-tensor
    torch.lerp(..., out=) into the same tensors;
  * "fresh memory" (CPU): allocating the K outputs' worth of memory and touching every page once,
    with the huge-page hint blend uses and with plain 4 KiB pages (the page-fault cost inside "new
    outputs"), and blend's own fresh outputs against fresh torch.empty_like outputs.
  * "task arithmetic": theta_0 + sum_t 0.3 tau_t over 8 task vectors on ViT-B-32's visual tower, as one
    dawin_ext.blend of 9 sources into preallocated outputs vs an in-place torch accumulate (copy_, then 8 add_);
    extra_info["bytes_moved"] (10 x 4 bytes per parameter) turns the median into GB/s.
`dawin-ext bench` prints the same comparison as one table, and on the CPU each memory-bound row's fraction of the
copy bandwidth measured in the same run (dawin_ext.cli.bench.cpu_bandwidth_rows).
"""

from __future__ import annotations

import pytest
import torch

import dawin_ext
from dawin_ext.cli.bench import CLUSTER_ALPHAS, TASK_ARITHMETIC_SCALE, vit_b32_state_dicts
from dawin_ext.ops.wrappers import _hint_huge_pages
from dawin_ext.testing.reference_ops import interpolation_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
COEF = [[1.0 - a, a] for a in CLUSTER_ALPHAS]
# Each call moves gigabytes; a few rounds are enough for a stable median.
PEDANTIC = {"rounds": 5, "iterations": 1, "warmup_rounds": 1}


@pytest.fixture(scope="module", params=DEVICES)
def vit(request):
    device = torch.device(request.param)
    sd0, sd1 = vit_b32_state_dicts(device, quick=False)
    out = [{k: torch.empty_like(v) for k, v in sd0.items()} for _ in CLUSTER_ALPHAS]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return device, sd0, sd1, out, sync


@pytest.fixture
def cpu_vit(vit):
    """``vit`` on the CPU only (a skip elsewhere): for the rows that time page faults of fresh host memory."""
    if vit[0].type != "cpu":
        pytest.skip("page faults of fresh host memory are a CPU cost")
    return vit


def _reference(sd0, sd1):
    return [interpolation_reference(a, sd0, sd1) for a in CLUSTER_ALPHAS]


@pytest.mark.parametrize("impl", ["reference", "dawin_ext"])
def test_blend_new_outputs(benchmark, vit, impl):
    device, sd0, sd1, _, sync = vit

    def run():
        r = _reference(sd0, sd1) if impl == "reference" else dawin_ext.blend([sd0, sd1], COEF)
        sync()
        return r

    benchmark.group = f"blend {device.type} ViT-B-32 K=3 new outputs"
    got = benchmark.pedantic(run, **PEDANTIC)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    torch.testing.assert_close(got[1][key], 0.5 * sd0[key] + 0.5 * sd1[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "lerp_out", "dawin_ext"])
def test_blend_out(benchmark, vit, impl):
    device, sd0, sd1, out, sync = vit

    def lerp_out():
        for a, o in zip(CLUSTER_ALPHAS, out, strict=True):
            for k, v in sd0.items():
                torch.lerp(v, sd1[k], a, out=o[k])

    fn = {
        "reference": lambda: _reference(sd0, sd1),
        "lerp_out": lerp_out,
        "dawin_ext": lambda: dawin_ext.blend([sd0, sd1], COEF, out=out),
    }[impl]

    def run():
        fn()
        sync()

    benchmark.group = f"blend {device.type} ViT-B-32 K=3 out="
    benchmark.extra_info["bytes_moved"] = sum(v.numel() * v.element_size() for v in sd0.values()) * (2 + len(COEF))
    benchmark.pedantic(run, **PEDANTIC)


@pytest.mark.parametrize("pages", ["huge_page_hint", "4k_pages"])
def test_fresh_output_memory(benchmark, cpu_vit, pages):
    _, sd0, _, _, _ = cpu_vit
    numel = sum(v.numel() for v in sd0.values()) * len(CLUSTER_ALPHAS)

    def run():
        buf = torch.empty(numel, dtype=torch.float32)
        if pages == "huge_page_hint":
            _hint_huge_pages(buf)
        buf.fill_(0.0)  # one parallel first touch of every page

    benchmark.group = "fresh memory for K=3 ViT-B-32 outputs: allocate + first touch"
    benchmark.pedantic(run, **PEDANTIC)


@pytest.mark.parametrize("pages", ["huge_page_hint", "4k_pages"])
def test_blend_into_fresh_outputs(benchmark, cpu_vit, pages):
    """blend's own fresh outputs (huge-page hint) against fresh torch.empty_like outputs passed as out=."""
    _, sd0, sd1, _, _ = cpu_vit

    def run():
        if pages == "huge_page_hint":
            dawin_ext.blend([sd0, sd1], COEF)
        else:
            dawin_ext.blend([sd0, sd1], COEF, out=[{k: torch.empty_like(v) for k, v in sd0.items()} for _ in COEF])

    benchmark.group = "blend cpu ViT-B-32 K=3 into fresh outputs"
    benchmark.pedantic(run, **PEDANTIC)


@pytest.fixture(scope="module", params=DEVICES)
def task_vectors(request):
    device = torch.device(request.param)
    theta0 = {k: v for k, v in vit_b32_state_dicts(device, quick=False, num_sources=1)[0].items() if "visual." in k}
    gen = torch.Generator().manual_seed(3)
    taus = [{k: (torch.rand(v.shape, generator=gen) * 0.02 - 0.01).to(v) for k, v in theta0.items()} for _ in range(8)]
    merged = {k: torch.empty_like(v) for k, v in theta0.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return device, theta0, taus, merged, sync


@pytest.mark.parametrize("impl", ["accumulate", "dawin_ext"])
def test_task_arithmetic_8_task_vectors(benchmark, task_vectors, impl):
    device, theta0, taus, merged, sync = task_vectors
    coef = [[1.0] + [TASK_ARITHMETIC_SCALE] * len(taus)]

    def accumulate():
        for k, o in merged.items():
            o.copy_(theta0[k])
            for tau in taus:
                o.add_(tau[k], alpha=TASK_ARITHMETIC_SCALE)

    fn = accumulate if impl == "accumulate" else (lambda: dawin_ext.blend([theta0, *taus], coef, out=[merged]))

    def run():
        fn()
        sync()

    benchmark.group = f"task arithmetic {device.type} ViT-B-32 visual, 8 task vectors, out="
    benchmark.extra_info["bytes_moved"] = sum(v.numel() * v.element_size() for v in theta0.values()) * (len(taus) + 2)
    benchmark.pedantic(run, **PEDANTIC)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    want = theta0[key] + TASK_ARITHMETIC_SCALE * sum(tau[key] for tau in taus)
    torch.testing.assert_close(merged[key], want, atol=1e-5, rtol=1e-5)
