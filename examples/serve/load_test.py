"""A bounded load test of the example service on loopback: N concurrent clients, a fixed number of requests.

Good requests (``.npy`` batches of 1 to 4 images, and encoded PNG images) are mixed with bad ones (wrong image size,
garbage bytes, an empty batch, NaN, a wrong content type, an undecodable image). The test checks that every good
request succeeds with the answer an offline predictor gives for the same input, that every bad request gets its
4xx, and that the server's resident memory stays flat: the requests run in three phases (warm-up, A, B) and the
RSS after B may exceed the RSS after A by at most ``max(16 MiB, 2 %)``. It records throughput, p50 and p99.

The run is bounded: a fixed request count, a wall-clock limit after which clients stop (unfinished requests count
as failures), 127.0.0.1 only, and the server it started is stopped at the end.

Run: ``python examples/serve/load_test.py [--arch ViT-B-32] [--clients 8] [--requests 400]``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


@dataclass
class Req:
    name: str
    path: str
    body: bytes
    content_type: str
    status: int  # expected
    x: torch.Tensor | None = None  # the preprocessed batch of a good request
    expected: dict = field(default_factory=dict)  # filled by attach_expected


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def png(seed: int, size: int = 48) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size + seed % 7, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_requests(n: int, shape: tuple[int, ...], preprocess, bad_every: int = 7, seed: int = 0) -> list[Req]:
    """``n`` requests; every ``bad_every``-th is a bad one (cycling through the kinds)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    c, s, _ = shape
    bad = [
        (
            "wrong image size",
            "/v1/predict",
            npy(np.zeros((1, c, s // 2, s // 2), np.float32)),
            "application/x-npy",
            422,
        ),
        ("garbage bytes", "/v1/predict", bytes(range(256)) * 4, "application/x-npy", 400),
        ("empty batch", "/v1/predict", npy(np.zeros((0, c, s, s), np.float32)), "application/x-npy", 422),
        ("NaN pixel", "/v1/predict", npy(np.full((1, c, s, s), np.nan, np.float32)), "application/x-npy", 422),
        ("wrong content type", "/v1/predict", b"{}", "application/json", 415),
        ("undecodable image", "/v1/classify", b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png", 400),
        ("empty image", "/v1/classify", b"", "image/jpeg", 400),
    ]
    reqs = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            name, path, body, ctype, status = bad[(i // bad_every) % len(bad)]
            reqs.append(Req(name, path, body, ctype, status))
        elif i % 5 == 4:
            data = png(i)
            x = preprocess(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
            reqs.append(Req("png image", "/v1/classify", data, "image/png", 200, x))
        else:
            b = 1 + i % 4
            x = torch.randn(b, *shape, generator=g) * (0.5 + 2.5 * torch.rand(b, 1, 1, 1, generator=g))
            reqs.append(Req(f"npy batch {b}", "/v1/predict", npy(x.numpy()), "application/x-npy", 200, x))
    return reqs


def attach_expected(reqs: list[Req], predictor, dawin) -> None:
    """Offline answers for the good requests: the same predictor class, and ``DaWin.predict`` itself."""
    for r in reqs:
        if r.x is not None:
            r.expected = {"predictor": predictor(r.x), "predict": dawin.predict(r.x, mode=predictor.mode)}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def run_phase(host: str, port: int, reqs: list[Req], clients: int, deadline: float) -> list[dict]:
    """Sends ``reqs`` from ``clients`` threads (one keep-alive connection each); returns one record per request."""
    work: queue.Queue = queue.Queue()
    for i, r in enumerate(reqs):
        work.put((i, r))
    records: list[dict] = []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=max(1.0, deadline - time.time()))
        try:
            while time.time() < deadline:
                try:
                    i, r = work.get_nowait()
                except queue.Empty:
                    return
                rec = {"i": i, "name": r.name, "expected_status": r.status}
                t0 = time.perf_counter()
                try:
                    conn.request("POST", r.path, body=r.body, headers={"Content-Type": r.content_type})
                    resp = conn.getresponse()
                    payload = resp.read()
                    rec.update(status=resp.status, latency_s=time.perf_counter() - t0, body=json.loads(payload))
                except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash of the test
                    rec.update(status=None, error=f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=max(1.0, deadline - time.time()))
                with lock:
                    records.append(rec)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def check(reqs: list[Req], records: list[dict], atol: float = 1e-5) -> dict:
    """Compares every record with its request's expectation; returns counts and the first problems."""
    problems: list[str] = []
    bitwise = close = 0
    max_diff = 0.0
    for rec in records:
        r = reqs[rec["i"]]
        if rec.get("status") != r.status:
            problems.append(f"request {rec['i']} ({r.name}): status {rec.get('status')} != {r.status} {rec}")
            continue
        if r.status != 200:
            if not rec["body"].get("error"):
                problems.append(f"request {rec['i']} ({r.name}): a {r.status} without an error message")
            continue
        got = torch.tensor(rec["body"]["logits"], dtype=torch.float32)
        same = torch.equal(got, r.expected["predictor"])
        bitwise += same
        diff = float((got - r.expected["predict"]).abs().max())
        max_diff = max(max_diff, diff)
        if diff <= atol and rec["body"]["predictions"] == r.expected["predict"].argmax(1).tolist():
            close += 1
        else:
            problems.append(f"request {rec['i']} ({r.name}): differs from offline DaWin.predict by {diff}")
        if not same:
            problems.append(f"request {rec['i']} ({r.name}): not bit-identical to the offline predictor")
    missing = len(reqs) - len(records)
    if missing:
        problems.append(f"{missing} requests were not sent before the deadline")
    good = sum(r.status == 200 for r in reqs)
    return {"good": good, "bad": len(reqs) - good, "bitwise_equal": bitwise, "close_to_predict": close,
            "max_abs_diff_vs_predict": max_diff, "problems": problems}  # fmt: skip


def load_test(
    host: str,
    port: int,
    reqs: list[Req],
    clients: int,
    time_limit_s: float,
    rss: Callable[[], int],
    warmup_fraction: float = 0.1,
) -> dict:
    """Warm-up, phase A, phase B (RSS after each), then :func:`check`; returns the summary."""
    deadline = time.time() + time_limit_s
    n_warm = max(clients, int(len(reqs) * warmup_fraction))
    half = n_warm + (len(reqs) - n_warm) // 2
    phases = {"warmup": reqs[:n_warm], "A": reqs[n_warm:half], "B": reqs[half:]}
    records, rss_after, timed, wall = [], {"start": rss()}, [], 0.0
    offset = 0
    for name, part in phases.items():
        t0 = time.perf_counter()
        recs = run_phase(host, port, part, clients, deadline)
        if name != "warmup":
            wall += time.perf_counter() - t0
            timed += [r for r in recs if r.get("latency_s") is not None and part[r["i"]].status == 200]
        for r in recs:
            r["i"] += offset
        offset += len(part)
        records += recs
        rss_after[name] = rss()
    summary = check(reqs, records)
    lat = sorted(r["latency_s"] for r in timed)
    growth = rss_after["B"] - rss_after["A"]
    limit = max(16 << 20, 0.02 * rss_after["A"])
    summary.update(
        requests=len(reqs), clients=clients, sent=len(records),
        throughput_rps=(len(reqs) - n_warm) / wall if wall else None,
        p50_ms=1e3 * statistics.median(lat) if lat else None,
        p99_ms=1e3 * lat[min(len(lat) - 1, max(0, -(-99 * len(lat) // 100) - 1))] if lat else None,
        rss_mib={k: round(v / 2**20, 1) for k, v in rss_after.items()},
        rss_growth_mib=round(growth / 2**20, 1), rss_flat=growth <= limit,
    )  # fmt: skip
    if not summary["rss_flat"]:
        summary["problems"].append(
            f"RSS grew by {growth / 2**20:.1f} MiB between phase A and B (limit {limit / 2**20:.1f})"
        )
    return summary


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[int]:
    """Runs ``app`` with uvicorn on 127.0.0.1 in a background thread; yields the port; stops it afterwards."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError("uvicorn did not start within 30 s")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="a bundle from make_bundle.py (default: make one for --arch in a temp dir)")
    parser.add_argument("--arch", default="dawin-tiny-vit")
    parser.add_argument("--mode", default="cluster", choices=["cluster", "exact"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds; clients stop after it")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, server and offline")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from app import load_bundle
    from make_bundle import make_bundle

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else make_bundle(Path(tmp) / "bundle", args.arch)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, str(HERE / "app.py"), "--bundle", str(bundle), "--mode", args.mode,
               "--host", "127.0.0.1", "--port", str(port), "--threads", str(args.threads)]  # fmt: skip
        server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            predictor, preprocess, _ = load_bundle(bundle, args.mode)
            reqs = build_requests(args.requests, predictor.input_shape, preprocess)
            attach_expected(reqs, predictor, predictor.dawin)
            deadline = time.time() + 600
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with {server.returncode}")
                with contextlib.suppress(OSError):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/healthz")
                    if conn.getresponse().status == 200:
                        break
                if time.time() > deadline:
                    raise RuntimeError("the server did not answer /healthz within 600 s")
                time.sleep(0.5)
            summary = load_test("127.0.0.1", port, reqs, args.clients, args.time_limit, lambda: rss_bytes(server.pid))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    summary.update(arch=args.arch, mode=args.mode, torch_threads=args.threads)
    print(json.dumps({k: v for k, v in summary.items() if k != "problems"}, indent=1))
    for p in summary["problems"][:20]:
        print("PROBLEM:", p)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
