"""Evaluation across processes (gloo on the CPU, 2 and 3 ranks) gives the numbers of one process.

* API: ``DaWin.fit`` / ``predict_dataset`` and ``DaWinMultiTask`` in a process group started with
  ``torch.multiprocessing`` on a tiny open_clip classifier: lambda, offset statistics, mixture assignments and
  cluster coefficients are bit-identical to one process and identical on every rank; cluster-wise logits are
  bit-identical too (the shards follow batch boundaries, so every model sees the same batches); exact-mode logits
  are compared within 1e-5 absolute (the bound the issue allows for reduction order; they are in fact equal here).
  AdaWiSE is per rank: it equals one process restarted at each shard's first batch.
* CLI: ``torchrun --nproc_per_node=N -m dawin_ext.cli eval`` writes the single-process JSON's accuracies plus
  ``world_size`` and each rank's sample count; a rank that raises brings the job down quickly with that rank's
  message; ``--resume`` after a killed run redoes only the unfinished test sets.

Ports: free ports on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dawin_ext.methods import distributed as dd

ROOT = Path(__file__).resolve().parents[2]
N_SAMPLES = 25  # not a multiple of the batch size nor of 2 or 3 ranks
BATCH = 4
EXACT_ATOL = 1e-5  # exact-mode logits: allowed difference from one process (float reduction order)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ pure functions
@pytest.mark.parametrize("n, world, block", [(25, 2, 4), (25, 3, 4), (7, 3, 1), (2, 3, 4), (0, 2, 3), (64, 3, 8)])
def test_shard_range_covers_each_sample_once(n, world, block):
    shards = [dd.shard_range(n, r, world, block) for r in range(world)]
    covered = [i for s in shards for i in range(*s)]
    assert covered == list(range(n))  # contiguous, in rank order, no padding, no duplicates
    for start, _ in shards:
        assert start % block == 0 or start == n  # shards start on batch boundaries
    sizes = [-(-(b - a) // block) for a, b in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced to within one block


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank 3 is outside"):
        dd.shard_range(10, 3, 3)
    with pytest.raises(ValueError, match="block >= 1"):
        dd.shard_range(10, 0, 2, block=0)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    dd.atomic_write_text(path, '{"old": 1}')

    with pytest.raises(TypeError):
        dd.atomic_write_text(path, 123)  # write() of a non-str fails after the temporary file exists
    assert path.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------ API workers
def _tiny_problem():
    """The tiny open_clip classifier, a fine-tuned copy and N_SAMPLES inputs: identical in every process."""
    from conftest import tiny_clip_pair  # here, not at the top: spawned workers build the same problem

    clf, zs, ft, _ = tiny_clip_pair(["cat", "dog", "car", "tree", "boat"], seed=0, noise_seed=1, noise=0.5)
    x = torch.randn(N_SAMPLES, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # dawin-tiny-vit: 32 px
    y = torch.arange(N_SAMPLES) % 5
    return clf, zs, ft, x, y


def _loader(x, y, sampler=None):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False, sampler=sampler)


def _run_methods(clf, zs, ft, loader_fn, group) -> dict:
    """Everything the equality test compares, from one process or one rank."""
    from dawin_ext import AdaWiSE, DaWin
    from dawin_ext.methods.multitask import DaWinMultiTask

    out = {}
    for name, kwargs in {
        "plain": {},
        "offset": {"offset_adjustment": True, "temperatures": (0.9, 1.1)},
        "ce": {"expertise": "cross_entropy", "offset_adjustment": True},
    }.items():
        dw = DaWin(clf, zs, ft, n_clusters=3, seed=1, **kwargs).fit(loader_fn(), group=group)
        out[name] = {
            "lambda": dw.coefficients_,
            "labels": dw.labels_,
            "means": dw.cluster_coefficients_,
            "offset": dw.offset_,
            "cluster": dw.predict_dataset(loader_fn(), "cluster", group=group),
        }
        if name == "plain":
            out[name]["exact"] = dw.predict_dataset(loader_fn(), "exact", group=group)
            out[name]["logits_zs"] = dw.logits_[0]
    mt = DaWinMultiTask(clf, zs, [ft, {k: 2 * v - zs[k] for k, v in ft.items()}], n_clusters=2, seed=0)
    mt.fit(loader_fn(), group=group)
    out["multitask"] = {"pi": mt.pi_, "labels": mt.labels_, "cluster_pi": mt.cluster_pi_}
    out["multitask"]["cluster"] = mt.predict_dataset(loader_fn(), group=group)
    ada = AdaWiSE(clf, zs, ft, n_evals=4, n_init=3, seed=1)
    out["adawise"] = ada.predict_dataset(loader_fn())
    out["adawise_alphas"] = [h["alpha"] for h in ada.history_]
    return out


def _api_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=_td(60)
    )
    from dawin_ext import DaWin
    from dawin_ext.methods.multitask import DaWinMultiTask

    try:
        clf, zs, ft, x, y = _tiny_problem()
        sampler = dd.ShardSampler(N_SAMPLES, block=BATCH)
        out = _run_methods(clf, zs, ft, lambda: _loader(x, y, sampler), None)  # group detected
        out["shard"] = (sampler.start, sampler.stop)
        # 4 samples in one batch: every rank but the last has an empty shard, and still takes part.
        small = dd.ShardSampler(4, block=BATCH)
        dw = DaWin(clf, zs, ft, n_clusters=2, seed=1).fit(_loader(x[:4], y[:4], small))
        mt = DaWinMultiTask(clf, zs, [ft], n_clusters=1).fit(_loader(x[:4], y[:4], small))
        out["empty"] = {
            "lambda": dw.coefficients_,
            "cluster": dw.predict_dataset(_loader(x[:4], y[:4], small)),
            "multitask": mt.predict_dataset(_loader(x[:4], y[:4], small)),
        }
        bar = dd.GlobalProgress(N_SAMPLES, "test bar", True, dd.active_group())
        has_bar = bar.bar is not None
        for _ in bar.wrap(_loader(x, y, sampler)):
            pass
        dd.barrier(dd.active_group(), timeout_s=60)
        out["progress"] = (has_bar, bar.store.add(bar.key, 0))  # (a bar on this rank?, samples counted)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _td(s):
    from datetime import timedelta

    return timedelta(seconds=s)


@pytest.fixture(scope="module")
def single_process_results():
    clf, zs, ft, x, y = _tiny_problem()
    return _run_methods(clf, zs, ft, lambda: _loader(x, y), None)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def dist_results(request, tmp_path_factory):
    """Every rank's results of _run_methods in a gloo group of 2 or 3 processes (one spawn per world size)."""
    import torch.multiprocessing as mp

    world = request.param
    out = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(_api_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.slow
def test_api_matches_single_process(dist_results, single_process_results):
    ref, ranks = single_process_results, dist_results
    shards = [r["shard"] for r in ranks]
    assert [i for s in shards for i in range(*s)] == list(range(N_SAMPLES))
    for got in ranks:
        for name in ("plain", "offset", "ce"):
            for key in ("lambda", "labels", "means"):
                assert torch.equal(got[name][key], ref[name][key]), (name, key)  # bit for bit, on every rank
            assert got[name]["offset"] == ref[name]["offset"], name
        for key in ("pi", "labels", "cluster_pi"):
            assert torch.equal(got["multitask"][key], ref["multitask"][key]), key
    for r, got in enumerate(ranks):
        s0, s1 = shards[r]
        assert torch.equal(got["plain"]["logits_zs"], ref["plain"]["logits_zs"][s0:s1])
        for name in ("plain", "offset", "ce"):
            assert torch.equal(got[name]["cluster"], ref[name]["cluster"][s0:s1]), name
        assert torch.equal(got["multitask"]["cluster"], ref["multitask"]["cluster"][s0:s1])
        torch.testing.assert_close(got["plain"]["exact"], ref["plain"]["exact"][s0:s1], rtol=0, atol=EXACT_ATOL)
    # Empty shards (4 samples, one batch, on the last rank): same lambda everywhere, empty predictions elsewhere.
    from dawin_ext import DaWin

    clf, zs, ft, x, y = _tiny_problem()
    small = DaWin(clf, zs, ft, n_clusters=2, seed=1).fit(_loader(x[:4], y[:4]))
    for r, got in enumerate(ranks):
        assert torch.equal(got["empty"]["lambda"], small.coefficients_)
        n = 4 if r == len(ranks) - 1 else 0
        assert got["empty"]["cluster"].shape == (n, 5) and got["empty"]["multitask"].shape == (n, 5)
    assert torch.equal(ranks[-1]["empty"]["cluster"], small.predict_dataset(_loader(x[:4], y[:4])))
    # One progress bar, on rank 0, counting the samples of all ranks.
    assert [r["progress"] for r in ranks] == [(True, N_SAMPLES)] + [(False, N_SAMPLES)] * (len(ranks) - 1)
    # Accuracies from per-rank counts equal one process's.
    y = torch.arange(N_SAMPLES) % 5
    for name in ("plain", "offset", "ce"):
        correct = sum(
            int((g[name]["cluster"].argmax(1) == y[slice(*s)]).sum()) for g, s in zip(ranks, shards, strict=True)
        )
        assert correct / N_SAMPLES == float((ref[name]["cluster"].argmax(1) == y).double().mean())
    # The mixtures really cluster (more than one cluster used), so the equalities above are not vacuous.
    assert len(torch.unique(ref["plain"]["labels"])) > 1
    # (The reference's simplified Dirichlet mixture puts these pi into one cluster; pi itself varies per sample.)
    assert float(ref["multitask"]["pi"].std(dim=0).min()) > 0.01


def test_adawise_is_per_rank(dist_results, single_process_results):
    """AdaWiSE has nothing global: each rank optimises alpha per batch of its shard, its warm-start chain
    restarting at the shard's first batch. It equals one process run on each shard separately."""
    from dawin_ext import AdaWiSE

    clf, zs, ft, x, y = _tiny_problem()
    for got in dist_results:
        s0, s1 = got["shard"]
        expected = AdaWiSE(clf, zs, ft, n_evals=4, n_init=3, seed=1).predict_dataset(_loader(x[s0:s1], y[s0:s1]))
        assert torch.equal(got["adawise"], expected)
    # Rank 0's chain is the start of one process's chain.
    first = dist_results[0]["adawise_alphas"]
    assert first == single_process_results["adawise_alphas"][: len(first)]


def _failing_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=_td(60)
    )
    from dawin_ext import DaWin

    clf, zs, ft, x, y = _tiny_problem()
    if rank == world - 1:
        x = x.clone()
        x[-1] = float("nan")  # this rank's last sample makes NaN logits
    sampler = dd.ShardSampler(N_SAMPLES, block=BATCH)
    try:
        DaWin(clf, zs, ft).fit(_loader(x, y, sampler))
    except Exception as e:  # noqa: BLE001
        (Path(out_dir) / f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_api_failure_reaches_every_rank(tmp_path):
    import torch.multiprocessing as mp

    world = 3
    mp.spawn(_failing_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    # RankFailedError (not a gloo timeout) on the healthy ranks: they learnt of the failure at the agreement step
    # right after the local phase, not by waiting out the collective timeout.
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(world)]
    assert msgs[2].startswith("ValueError: zero-shot model: logits of sample")
    for m in msgs[:2]:
        assert m.startswith("RankFailedError: DaWin.fit: rank 2 failed: ValueError: zero-shot model: logits of sample")


def test_group_false_and_no_group_are_single_process():
    assert dd.active_group(False) is None
    assert dd.active_group(None) is None
    with pytest.raises(RuntimeError, match="not initialised"):
        dd.active_group(True)


# ------------------------------------------------------------------------------------------------ CLI under torchrun
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """test_cli_eval's generated ImageFolder sets (30 images, 3 classes) and tiny open_clip checkpoints."""
    from eval_setup import ARCH, build_setup

    return build_setup(
        tmp_path_factory.mktemp("dist_eval"), ARCH, "dawin-tiny-vit", n_sets=2, train_steps=4, train_lr=3e-3
    )


def _eval_args(setup, *extra, data=None) -> list[str]:
    from eval_setup import eval_args

    return eval_args(setup, "--alpha", "0.3", "--adawise-evals", "4", "--no-progress", *extra, data=data)


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        "--monitor-interval=0.2",
        "-m",
        "dawin_ext.cli",
        *args,
    ]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _single_process(setup, tmp_path, *extra, data=None) -> dict:
    from dawin_ext import cli

    out = tmp_path / "single.json"
    assert cli.main(_eval_args(setup, "--json", str(out), *extra, data=data)) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, batch, split",
    [
        (2, "8", [16, 14]),  # 4 batches of 8 (the last one short): two per rank
        (3, "16", [0, 16, 14]),  # 2 batches for 3 ranks: rank 0 has an empty shard and still writes the results
    ],
)
def test_cli_torchrun_matches_single_process(eval_setup, tmp_path, world, batch, split):
    out = tmp_path / "dist.json"
    args = _eval_args(eval_setup, "--json", str(out), "--batch-size", batch)
    proc = subprocess.run(_torchrun(world, args), capture_output=True, text=True, timeout=240, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = json.loads(out.read_text()), _single_process(eval_setup, tmp_path, "--batch-size", batch)
    assert got["accuracy"] == ref["accuracy"]  # exact: summed (correct, total) counts, same batches as one process
    assert list(got["accuracy"]) == list(ref["accuracy"]) and got["settings"] == ref["settings"]
    assert got["world_size"] == world and ref["world_size"] == 1 and got["complete"] is True
    for name, entry in got["test_sets"].items():
        assert entry["samples"] == 30 and entry["rank_samples"] == split
        assert ref["test_sets"][name]["rank_samples"] == [30]
    # Rank 0 alone prints: one table, one header line.
    assert proc.stdout.count("dawin-cluster") == 1
    assert proc.stderr.count(f"{world} ranks (gloo)") == 1


@pytest.mark.slow
def test_cli_failing_rank_stops_the_job(eval_setup, tmp_path):
    bad = tmp_path / "bad_set"
    shutil.copytree(eval_setup["sets"][1], bad)
    (bad / "zebra" / "05.png").write_bytes(b"not a png")  # zebra sorts last: in rank 2's shard
    cmd = _torchrun(
        3, [*_eval_args(eval_setup, "--methods", "zeroshot", "dawin-cluster", data=[bad]), "--dist-timeout", "300"]
    )
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 300  # well inside the collective timeout: the ranks agreed on the failure
    err = proc.stderr
    assert "[rank 2] DaWin fit on bad_set: cannot read image" in err and "5.png" in err
    for r in (0, 1):
        assert f"[rank {r}] DaWin.fit: rank 2 failed: EvalError: cannot read image" in err


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.slow
def test_cli_resume_after_killed_run(eval_setup, tmp_path):
    set_a = tmp_path / "set_a"
    set_b = tmp_path / "set_b"
    shutil.copytree(eval_setup["sets"][0], set_a)
    shutil.copytree(eval_setup["sets"][1], set_b)
    stuck = set_b / "zebra" / "05.png"
    original = stuck.read_bytes()
    stuck.unlink()
    os.mkfifo(stuck)  # opening it blocks: the run stops inside set_b, deterministically, until killed
    out = tmp_path / "results.json"
    methods = ("--methods", "zeroshot", "finetuned", "dawin-cluster")
    args = [*_eval_args(eval_setup, *methods, "--json", str(out), data=[set_a, set_b]), "--dist-timeout", "120"]
    proc = subprocess.Popen(_torchrun(2, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and "set_a" in json.loads(out.read_text())["test_sets"]):
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "set_a's results never appeared"
            time.sleep(0.2)
    finally:
        for pid in [*_descendants(proc.pid), proc.pid]:  # kill -9 the whole job, workers first
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and list(partial["test_sets"]) == ["set_a"]
    assert partial["test_sets"]["set_a"]["rank_samples"] == [16, 14]

    stuck.unlink()
    stuck.write_bytes(original)
    proc = subprocess.run(_torchrun(3, [*args, "--resume"]), capture_output=True, text=True, timeout=240, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "set_a: complete in" in proc.stderr and "skipped (--resume)" in proc.stderr
    final = json.loads(out.read_text())
    assert final["complete"] is True and list(final["test_sets"]) == ["set_a", "set_b"]
    assert final["test_sets"]["set_a"]["rank_samples"] == [16, 14]  # kept from the killed 2-rank run
    assert final["test_sets"]["set_b"]["rank_samples"] == [8, 8, 14]  # computed now, on 3 ranks
    ref = _single_process(eval_setup, tmp_path, *methods, data=[set_a, set_b])
    assert final["accuracy"] == ref["accuracy"]
    # Other settings than the file's: refused, not mixed.
    from dawin_ext import cli

    assert (
        cli.main(
            [*_eval_args(eval_setup, *methods, "--json", str(out), data=[set_a, set_b]), "--seed", "2", "--resume"]
        )
        == 2
    )
