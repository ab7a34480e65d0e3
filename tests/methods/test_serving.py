"""DaWinPredictor: same answers as DaWin.predict, no per-request parameter buffers, threads, torch.compile."""

from __future__ import annotations

import gc
import os
import threading
import warnings

import pytest
import torch
from conftest import fit_tiny_dawin

from dawin_ext.methods.dawin import DaWin
from dawin_ext.methods.serving import AUTO_FUSE_MAX_BATCH, BadRequestError, DaWinPredictor

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
TEMPS = (0.9576, 0.9733)
SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def fitted():
    dw, _, _, _, x = fit_tiny_dawin(TEMPS)
    return dw, x


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["cluster", "exact"])
@pytest.mark.parametrize("fused", [False, True, "auto"])
def test_predictor_matches_dawin_predict(fitted, mode: str, fused) -> None:
    dw, x = fitted
    p = DaWinPredictor(dw, mode, fused_experts=fused, input_shape=SHAPE)
    for sl in (slice(0, 1), slice(1, 9), slice(9, 40)):
        out = p(x[sl])
        ref = dw.predict(x[sl], mode=mode)
        unfused = fused is False or (fused == "auto" and sl.stop - sl.start > AUTO_FUSE_MAX_BATCH)
        if unfused:  # the same kernels in the same order
            assert torch.equal(out, ref)
        _close(out, ref)
        assert not out.is_inference() or out.shape == ref.shape


def test_fused_expert_pass_gives_both_experts(fitted) -> None:
    dw, x = fitted
    p = DaWinPredictor(dw, "cluster", input_shape=SHAPE)
    with torch.inference_mode():
        zs, ft = p.expert_logits(x[:5])
        _close(zs, dw.experts.models[0](x[:5]))
        _close(ft, dw.experts.models[1](x[:5]))


def _tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() wakes deprecated lazy objects (torch.distributed.reduce_op)
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("mode", ["cluster", "exact"])
def test_no_parameter_buffers_per_request(fitted, mode: str) -> None:
    dw, x = fitted
    p = DaWinPredictor(dw, mode, input_shape=SHAPE)

    def storage() -> list[tuple[str, int]]:
        return [
            (n, t.data_ptr()) for m in p.modules() for n, t in [*m.named_parameters(), *m.named_buffers()]
        ]  # every tensor a module owns

    for b in (1, 4):  # a fused and an unfused expert pass (fused_experts="auto") fill the engine's lasting caches
        p(x[:b])
    before, count = storage(), _tensor_count()
    for b in (1, 4, 7, 4):
        p(x[:b])
    assert storage() == before  # no parameter or buffer was replaced
    assert _tensor_count() == count  # nothing accumulates between requests (no cache grows per batch size)


@pytest.mark.parametrize("mode", ["cluster", "exact"])
def test_threads_get_sequential_answers(fitted, mode: str) -> None:
    dw, x = fitted
    p = DaWinPredictor(dw, mode, input_shape=SHAPE)
    batches = [x[i : i + n] for i, n in ((0, 1), (1, 3), (4, 8), (12, 2), (14, 5), (19, 1), (20, 6), (26, 4))]
    expected = [p(b) for b in batches]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            start.wait()
            for r in range(3):
                for i in range(t, len(batches) + t):  # each thread walks the batches from another offset
                    j = i % len(batches)
                    results[(t, r * 100 + j)] = p(batches[j])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert len(results) == 4 * 3 * len(batches)
    for (_, key), out in results.items():
        assert torch.equal(out, expected[key % 100]), key


def test_bad_requests_are_refused(fitted) -> None:
    dw, x = fitted
    p = DaWinPredictor(dw, "cluster", input_shape=SHAPE)
    with pytest.raises(BadRequestError, match="empty batch"):
        p(x[:0])
    with pytest.raises(BadRequestError, match=r"shape \(3, 32, 32\), got a batch of shape \(2, 3, 16, 16\)"):
        p(torch.zeros(2, 3, 16, 16))
    with pytest.raises(BadRequestError, match="floating point"):
        p(torch.zeros(1, *SHAPE, dtype=torch.uint8))
    bad = x[:3].clone()
    bad[2, 0, 0, 0] = float("nan")
    with pytest.raises(BadRequestError, match="sample 2"):
        p(bad)
    with pytest.raises(BadRequestError, match="tensor"):
        p([1, 2])
    assert torch.equal(p(x[:2]), DaWinPredictor(dw, "cluster", input_shape=SHAPE)(x[:2]))  # still fine


def test_predictor_validation(fitted) -> None:
    dw, _ = fitted
    with pytest.raises(ValueError, match="mode"):
        DaWinPredictor(dw, "fast")
    with pytest.raises(RuntimeError, match="fit"):
        DaWinPredictor(DaWin(dw.model, dw.theta_zs, dw.theta_ft))
    with pytest.raises(TypeError, match="DaWin"):
        DaWinPredictor(object())


# Inductor needs minutes per graph on a busy 2-core machine, so the default backend here is aot_eager: dynamo's
# capture and AOTAutograd's functionalisation (where graph breaks and state bugs show) without C++ codegen.
# DAWIN_EXT_COMPILE_BACKEND=inductor runs the same test with the default backend.
_BACKEND = os.environ.get("DAWIN_EXT_COMPILE_BACKEND", "aot_eager")


@pytest.mark.parametrize("mode", ["cluster", "exact"])
def test_torch_compile_gives_the_same_answers(fitted, mode: str) -> None:
    dw, x = fitted
    eager = DaWinPredictor(dw, mode, input_shape=SHAPE)
    opts = {"backend": _BACKEND, "dynamic": False}
    compiled = DaWinPredictor(dw, mode, compile=True, compile_options=opts, input_shape=SHAPE)
    for sl in (slice(0, 5), slice(5, 6), slice(6, 14)):
        _close(compiled(x[sl]), eager(x[sl]))


def test_request_path_kernels_compile_without_graph_breaks() -> None:
    """The compiled ops a request runs (entropy, the exact engine's linear kernel and combine) trace in one graph
    (fullgraph=True: a graph break raises) and give the eager answers."""
    import dawin_ext
    from dawin_ext.ops import samplewise_linear_weights

    def request_path(logits, x, w, c, stacked, sw):
        h = dawin_ext.softmax_entropy(logits, 0.9)
        y = dawin_ext.samplewise_linear(x, w, c)
        z = dawin_ext.sample_combine(stacked, sw)
        return h, y, z

    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(4, 10, generator=g),
        torch.randn(4, 3, 8, generator=g),
        samplewise_linear_weights([torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)]),
        torch.rand(4, 2, generator=g),
        torch.randn(4, 3, 2, 6, generator=g),
        torch.rand(4, 2, generator=g),
    )
    torch._dynamo.reset()
    compiled = torch.compile(request_path, fullgraph=True, backend=_BACKEND)
    with torch.inference_mode():
        for got, want in zip(compiled(*args), request_path(*args), strict=True):
            assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_cuda_graphs_through_reduce_overhead() -> None:
    """compile_options={"mode": "reduce-overhead"} records the plain models' forwards as CUDA graphs; replays must
    give the eager answers (unverified until a GPU runs it: benchmarks/gpu_check.sh runs this file on CUDA)."""
    _, clf, zs, ft, x = fit_tiny_dawin(TEMPS)
    dev = torch.device("cuda")
    on = {k: v.to(dev) for k, v in zs.items()}, {k: v.to(dev) for k, v in ft.items()}
    dw = DaWin(clf.to(dev), *on, temperatures=TEMPS, offset_adjustment=True, n_clusters=3, seed=1)
    dw.fit([x[:20].to(dev), x[20:].to(dev)])
    eager = DaWinPredictor(dw, "cluster", fused_experts=False, input_shape=SHAPE)
    opts = {"mode": "reduce-overhead", "dynamic": False}
    graphs = DaWinPredictor(dw, "cluster", fused_experts=False, compile=True, compile_options=opts, input_shape=SHAPE)
    xd = x.to(dev)
    for _ in range(3):  # warm-up, recording, then replays
        for sl in (slice(0, 8), slice(8, 16)):
            _close(graphs(xd[sl]), eager(xd[sl]))


# --------------------------------------------------------------------------------------------- the example server
def test_example_server_under_load(tmp_path) -> None:
    """examples/serve at reduced size: 4 clients, 200 requests with bad ones mixed in, on 127.0.0.1, in-process."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install dawin-ext[serve])")
    pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install dawin-ext[serve])")
    pytest.importorskip("PIL", reason="Pillow is needed to decode images")
    import http.client
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "serve"))
    try:
        import app as serve_app
        import load_test
        import make_bundle
    finally:
        sys.path.pop(0)

    bundle = make_bundle.make_bundle(tmp_path / "bundle", "dawin-tiny-vit")
    predictor, preprocess, classes = serve_app.load_bundle(bundle, "cluster")
    reqs = load_test.build_requests(200, predictor.input_shape, preprocess)
    load_test.attach_expected(reqs, predictor, predictor.dawin)  # offline answers, before any request is served
    assert sum(r.status != 200 for r in reqs) >= 25 and len({r.name for r in reqs if r.status != 200}) == 7
    with load_test.serve_in_thread(serve_app.create_app(predictor, preprocess, classes, request_threads=4)) as port:
        summary = load_test.load_test(
            "127.0.0.1", port, reqs, clients=4, time_limit_s=50, rss=lambda: load_test.rss_bytes(os.getpid())
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/healthz")
        health = json.loads(conn.getresponse().read())
    assert summary["problems"] == []
    assert summary["sent"] == 200 and summary["bitwise_equal"] == summary["good"] == summary["close_to_predict"]
    assert summary["rss_flat"], summary["rss_mib"]
    assert health["status"] == "ok" and health["stats"]["server_errors"] == 0
    assert health["stats"]["client_errors"] == summary["bad"]


def test_latency_bench_rows() -> None:
    from dawin_ext.cli.bench import format_latency_table, latency_rows

    rows = latency_rows(torch.device("cpu"), quick=True, repeats=2, batch_sizes=(1, 2), compiled=False)
    assert [(r["batch"], r["config"]) for r in rows[:2]] == [
        (1, "plain forward"),
        (1, "DaWin.predict cluster (3 passes)"),
    ]
    assert len(rows) == 10 and all(r["n"] == 2 and 0 < r["p50_s"] <= r["p99_s"] for r in rows)
    assert all(r["p50_vs_plain"] == 1.0 for r in rows if r["config"] == "plain forward")
    assert "predictor exact, fused experts" in format_latency_table(rows)


def test_fused_experts_setting_is_checked(fitted) -> None:
    dw, _ = fitted
    with pytest.raises(ValueError, match="fused_experts must be True, False or 'auto'"):
        DaWinPredictor(dw, "cluster", fused_experts="yes")
