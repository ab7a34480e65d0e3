"""Scaling of distributed evaluation: 1 rank x 1 thread against N ranks x 1 thread (gloo, this machine).

Run (a few minutes; on a quiet machine, with at least as many free cores as ranks):

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_distributed.py --ranks 1 2 --json bench_distributed.json

Each rank is one process with one intra-op thread, started with torch.multiprocessing and joined in a gloo group on
127.0.0.1. The 1-rank baseline runs the plain single-process code (no process group), so the efficiency includes
every cost of distribution. Data: random images (no decoding), sharded with ``ShardSampler(block=batch_size)``.

Timed pipelines (each phase fenced by barriers, so a phase's time is that of its slowest rank; medians of
``--repeats`` rounds after one warm-up round):

* ``fit``: ``DaWin.fit``: both experts over the shard, entropies gathered, Beta mixture on rank 0, broadcast,
  the K cluster models blended on every rank.
* ``cluster`` / ``exact``: ``predict_dataset`` in that mode plus the accuracy's all-reduced counts.
* pipelines: ``cluster-wise = fit + cluster`` and ``exact = fit + exact`` (what ``dawin-ext eval`` runs per test
  set for dawin-cluster and dawin-exact).

Reported: throughput (images/s) of each pipeline, parallel efficiency ``T_1 / (N * T_N)`` (goal >= 0.85 for
N = 2), the communication share: seconds inside dawin_ext.methods.distributed's collectives (waiting for the slowest rank
and rank 0's mixture fit included), over the pipeline's wall time, the largest over ranks; and the work ratio: CPU
seconds of all ranks together over one rank's (1.0 = distribution adds no work; on a machine whose cores are busy
with other jobs, efficiency falls below the work ratio's promise because the ranks do not get whole cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

# A ViT whose forward passes dominate at 1 thread (a few seconds per phase), without ViT-B-32's minutes.
BENCH_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(arch: str, n: int, image_size: int):
    from dawin_ext.integrations import openclip

    if arch == "dawin-bench-vit":
        openclip.register_model_config(BENCH_CONFIG, name=arch)
    else:
        openclip.register_tiny_configs()
    torch.manual_seed(0)
    model, _, tok = openclip.create_clip_model(arch)
    classes = [f"class {i}" for i in range(10)]
    clf = openclip.CLIPClassifier.from_clip(model, tok, classes, templates="classname")
    zs = {k: v.clone() for k, v in clf.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    ft = {k: v + 0.3 * v.std().nan_to_num(0.1) * torch.randn(v.shape, generator=g) for k, v in zs.items()}
    x = torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    y = torch.arange(n) % len(classes)
    return clf, zs, ft, x, y


def _worker(rank: int, world: int, port: int, opts: dict, out_dir: str) -> None:
    import torch.distributed as tdist

    from dawin_ext import DaWin
    from dawin_ext.methods import distributed as dd

    torch.set_num_threads(1)
    group = None
    if world > 1:
        tdist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
        group = tdist.group.WORLD
    clf, zs, ft, x, y = _problem(opts["arch"], opts["samples"], opts["image_size"])
    sampler = dd.ShardSampler(len(x), rank=rank, world_size=world, block=opts["batch"])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=opts["batch"], sampler=sampler, shuffle=False
    )
    y_local = y[sampler.start : sampler.stop]

    def fence() -> None:
        if group is not None:
            tdist.barrier(group=group)

    dw = DaWin(clf, zs, ft, n_clusters=3, seed=1)

    def accuracy(scores):
        counts = [int((scores.argmax(1) == y_local).sum()), int(y_local.shape[0])]
        return dd.all_sum_int(counts, group) if group is not None else counts

    phases = {
        "fit": lambda: dw.fit(loader, group=group if group is not None else False),
        "cluster": lambda: accuracy(dw.predict_dataset(loader, "cluster")),
        "exact": lambda: accuracy(dw.predict_dataset(loader, "exact")),
    }
    times: dict[str, list[float]] = {p: [] for p in phases}
    comm: dict[str, list[float]] = {p: [] for p in phases}
    cpu: dict[str, list[float]] = {p: [] for p in phases}
    for r in range(opts["repeats"] + 1):
        for name, fn in phases.items():
            fence()
            dd.reset_comm_seconds()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            c1 = time.process_time()
            fence()
            elapsed = time.perf_counter() - t0
            if r > 0:
                times[name].append(elapsed)
                comm[name].append(dd.comm_seconds())
                cpu[name].append(c1 - c0)
    result = {
        "rank": rank,
        "samples": len(sampler),
        "seconds": {p: statistics.median(v) for p, v in times.items()},
        "comm_seconds": {p: statistics.median(v) for p, v in comm.items()},
        "cpu_seconds": {p: statistics.median(v) for p, v in cpu.items()},
    }
    (Path(out_dir) / f"w{world}_r{rank}.json").write_text(json.dumps(result))
    if group is not None:
        tdist.destroy_process_group()


def _run_world(world: int, opts: dict, out_dir: str) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, _free_port(), opts, out_dir), nprocs=world, join=True)
    return [json.loads((Path(out_dir) / f"w{world}_r{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to time (1 = the baseline)")
    p.add_argument("--arch", default="dawin-bench-vit", help="dawin-bench-vit (default) or dawin-tiny-vit")
    p.add_argument("--samples", type=int, default=192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if 1 not in args.ranks:
        p.error("--ranks must include 1 (the baseline)")
    image_size = BENCH_CONFIG["vision_cfg"]["image_size"] if args.arch == "dawin-bench-vit" else 32
    opts = {
        "arch": args.arch,
        "samples": args.samples,
        "batch": args.batch,
        "repeats": args.repeats,
        "image_size": image_size,
    }
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    by_world: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for w in sorted(set(args.ranks)):
            by_world[w] = _run_world(w, opts, out_dir)

    def pipeline_seconds(ranks: list[dict], parts: tuple[str, ...]) -> tuple[float, float, float]:
        # Phases are fenced: every rank measured the same wall time (up to the fence's skew); take rank 0's.
        wall = sum(ranks[0]["seconds"][q] for q in parts)
        comm = max(sum(r["comm_seconds"][q] for q in parts) for r in ranks)
        cpu = sum(r["cpu_seconds"][q] for r in ranks for q in parts)  # CPU work of all ranks together
        return wall, comm, cpu

    pipelines = {"cluster-wise": ("fit", "cluster"), "exact": ("fit", "exact")}
    rows = []
    base = {name: pipeline_seconds(by_world[1], parts) for name, parts in pipelines.items()}
    for w, ranks in sorted(by_world.items()):
        for name, parts in pipelines.items():
            wall, comm, cpu = pipeline_seconds(ranks, parts)
            rows.append(
                {
                    "ranks": w,
                    "pipeline": name,
                    "seconds": wall,
                    "images_per_s": args.samples / wall,
                    "efficiency": base[name][0] / (w * wall),
                    "comm_share": comm / wall,
                    # Total CPU seconds of all ranks over one rank's: > 1 is work that distribution adds.
                    "work_ratio": cpu / base[name][2],
                    "rank_samples": [r["samples"] for r in ranks],
                    "phase_seconds": {q: ranks[0]["seconds"][q] for q in parts},
                }
            )
    print(
        f"arch {args.arch}, {args.samples} images, batch {args.batch}, 1 thread per rank, gloo, "
        f"medians of {args.repeats} rounds; machine: {os.cpu_count()} cores"
    )
    print(
        f"{'ranks':>5} {'pipeline':<13} {'seconds':>8} {'img/s':>8} {'efficiency':>10} {'comm share':>10} "
        f"{'work ratio':>10}"
    )
    for r in rows:
        print(
            f"{r['ranks']:>5} {r['pipeline']:<13} {r['seconds']:>8.2f} {r['images_per_s']:>8.1f} "
            f"{r['efficiency']:>10.2f} {r['comm_share']:>10.3f} {r['work_ratio']:>10.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": opts, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
