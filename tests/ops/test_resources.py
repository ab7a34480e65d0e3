"""Resources: repeated calls do not leak, and concurrent calls agree with sequential ones.

* 10,000 calls of each op (and of each op's error path) keep the process RSS flat, read from
  /proc/self/statm after a warm-up; on a GPU, ``torch.cuda.memory_allocated`` must return exactly to
  its starting value.
* 4 Python threads calling the ops concurrently on shared inputs give bit-identical results to the
  same calls made one after another.
"""

from __future__ import annotations

import gc
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dawin_ext import (
    blend,
    entropy_coefficients,
    interpolation,
    sample_combine,
    samplewise_linear,
    samplewise_linear_weights,
    softmax_entropy,
)

CALLS = 10_000
WARMUP = 500
# A leak of even 100 bytes per call would add ~1 MiB over 10,000 calls; allocator noise stays well below.
RSS_BOUND_BYTES = 4 << 20

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _state_dict(seed: int, device="cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(16, 8, generator=g).to(device),
        "b": torch.randn(16, generator=g).to(device),
        "h": torch.randn(8, 8, generator=g).half().to(device),
        "n": torch.tensor(seed, device=device),
    }


def _workloads(device="cpu") -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 32, generator=g).to(device)
    stacked_logits = torch.randn(2, 8, 32, generator=g).to(device)
    grad_logits = logits.clone().requires_grad_(True)
    sources = [_state_dict(1, device), _state_dict(2, device)]
    out = [{k: torch.empty_like(v) for k, v in sources[0].items()} for _ in range(3)]
    coef = torch.tensor([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]])
    stacked = torch.randn(4, 2, 3, 16, generator=g).to(device)
    weights = torch.rand(4, 3, generator=g).to(device)
    sw_input = torch.randn(4, 8, 24, generator=g).to(device)
    sw_weights = samplewise_linear_weights(list(torch.randn(3, 16, 24, generator=g).to(device)))

    def entropy_backward():
        softmax_entropy(grad_logits, 0.9).sum().backward()
        grad_logits.grad = None

    def bad_temperature():
        try:
            softmax_entropy(logits, -1.0)
        except ValueError:
            pass
        else:
            raise AssertionError("expected ValueError")

    def bad_blend():
        try:
            blend(sources, [[0.5, float("nan")]])
        except ValueError:
            pass
        else:
            raise AssertionError("expected ValueError")

    return {
        "softmax_entropy": lambda: softmax_entropy(logits, 0.9),
        "softmax_entropy_backward": entropy_backward,
        "entropy_coefficients": lambda: entropy_coefficients(stacked_logits, [0.9, 1.1], True),
        "entropy_coefficients_list": lambda: entropy_coefficients([stacked_logits[0], stacked_logits[1]]),
        "blend": lambda: blend(sources, coef),
        "blend_out": lambda: blend(sources, coef, out=out),
        "interpolation": lambda: interpolation(0.3, sources[0], sources[1]),
        "sample_combine": lambda: sample_combine(stacked, weights),
        "samplewise_linear": lambda: samplewise_linear(sw_input, sw_weights, weights),
        "error_path_kernel": bad_temperature,
        "error_path_python": bad_blend,
    }


# one_thread (conftest): leaks do not depend on the thread count, and on a busy 2-core machine every OpenMP
# region of a tiny call costs milliseconds of spinning, so the 10,000-call loops run on one intra-op thread.
@pytest.mark.slow
@pytest.mark.parametrize("name", list(_workloads()))
def test_rss_flat_over_10000_calls(name, one_thread):
    fn = _workloads()[name]
    for _ in range(WARMUP):
        fn()
    gc.collect()
    before = rss_bytes()
    for _ in range(CALLS):
        fn()
    gc.collect()
    growth = rss_bytes() - before
    assert growth < RSS_BOUND_BYTES, f"{name}: RSS grew by {growth / 2**20:.2f} MiB over {CALLS} calls"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_workloads()))
def test_cuda_memory_flat_over_10000_calls(name, cuda_device):
    fn = _workloads(cuda_device)[name]
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    gc.collect()
    before = torch.cuda.memory_allocated()
    for _ in range(CALLS):
        fn()
    torch.cuda.synchronize()
    gc.collect()
    after = torch.cuda.memory_allocated()
    assert after == before, f"{name}: {after - before} bytes of CUDA memory still allocated after {CALLS} calls"


def test_rss_probe_sees_an_allocation():
    # The measurement itself must be able to fail: 64 MiB touched shows up in /proc/self/statm.
    # A fresh anonymous mapping, so that memory the allocator kept from earlier tests cannot be reused.
    size = 64 << 20
    block = mmap.mmap(-1, size)
    before = rss_bytes()
    for offset in range(0, size, _PAGE):  # touch every page so it becomes resident
        block[offset] = 1
    assert rss_bytes() - before > 32 << 20
    block.close()


# --------------------------------------------------------------------------------------------
# Thread safety
# --------------------------------------------------------------------------------------------
def _as_tensors(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    if isinstance(result, (list, tuple)):
        return [t for r in result for t in _as_tensors(r)]
    return []


def _thread_tasks() -> list[Callable[[], object]]:
    """Many distinct calls (different shapes and inputs), each returning fresh tensors."""
    tasks = []
    for i in range(24):
        g = torch.Generator().manual_seed(100 + i)
        c = 3 + 7 * i
        logits = torch.randn(33, c, generator=g)
        stacked_logits = torch.randn(2, 17, c, generator=g)
        sources = [
            {"w": torch.randn(64, 9 + i, generator=g), "b": torch.randn(5, generator=g).bfloat16()} for _ in range(3)
        ]
        coef = torch.rand(2 + i % 4, 3, generator=g)
        stacked = torch.randn(6, 2, 3, 40 + i, generator=g)
        weights = torch.rand(6, 3, generator=g)
        sw_input = torch.randn(6, 7, 20 + i, generator=g)
        sw_weights = torch.randn(3, 11 + 3 * i, 20 + i, generator=g)
        tasks += [
            lambda x=logits, t=0.5 + i / 10: softmax_entropy(x, t),
            lambda x=stacked_logits: entropy_coefficients(x, [1.1, 0.9], True),
            lambda s=sources, k=coef: blend(s, k),
            lambda s=stacked, w=weights: sample_combine(s, w),
            lambda x=sw_input, w=sw_weights, c=weights: samplewise_linear(x, w, c),
        ]
    return tasks


def test_four_threads_match_sequential():
    tasks = _thread_tasks()
    expected = [_as_tensors(t()) for t in tasks]
    rounds = 5
    barrier = threading.Barrier(4)

    def worker(tid: int):
        barrier.wait()  # start together, for as much overlap as possible
        results = {}
        for r in range(rounds):
            order = list(range(len(tasks)))
            order = order[tid + r :] + order[: tid + r]  # each thread walks the tasks in its own order
            for j in order:
                results[(r, j)] = _as_tensors(tasks[j]())
        return results

    with ThreadPoolExecutor(max_workers=4) as pool:
        per_thread = list(pool.map(worker, range(4)))
    for tid, results in enumerate(per_thread):
        for (r, j), got in results.items():
            assert len(got) == len(expected[j])
            for a, b in zip(got, expected[j], strict=True):
                assert torch.equal(a, b), f"thread {tid}, round {r}, task {j}: result differs from the sequential one"


def test_four_threads_blend_into_separate_outputs():
    # out= writes into caller buffers: concurrent calls with different buffers must not interfere.
    g = torch.Generator().manual_seed(7)
    sources = [{"w": torch.randn(256, 129, generator=g), "v": torch.randn(1000, generator=g).half()} for _ in range(2)]
    alphas = [0.1, 0.35, 0.6, 0.9]
    outs = [[{k: torch.empty_like(v) for k, v in sources[0].items()}] for _ in alphas]
    barrier = threading.Barrier(4)

    def worker(i: int):
        barrier.wait()
        for _ in range(50):
            blend(sources, [[1 - alphas[i], alphas[i]]], out=outs[i])

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(worker, range(4)))
    for i, a in enumerate(alphas):
        ref = blend(sources, [[1 - a, a]])[0]
        for key in ref:
            assert torch.equal(outs[i][0][key], ref[key]), f"alpha {a}, key {key!r}"
