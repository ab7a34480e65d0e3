"""The embedded digits benchmark at reduced size: the setting's basic facts, and that the report comes from the run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dawin_ext.cli.demo.data import SHIFTS, TEST_SHIFTS, apply_shift, load_digits_splits, make_test_sets, normalize
from dawin_ext.cli.demo.model import build_model
from dawin_ext.cli.demo.report import (
    PLOT_FILES,
    SECTION_BEGIN,
    SECTION_END,
    results_table,
    update_results_section,
    write_report,
)
from dawin_ext.cli.demo.runner import DemoConfig, run_benchmark
from dawin_ext.cli.demo.train import TrainConfig, train_pair

# Tiny CNN, one sample at a time in the per-sample recomputation: a second thread only adds spinning (measured
# 0.2 s per single-sample forward on a loaded 2-core machine with two threads).
pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# Smaller than the full benchmark (fewer epochs, a test subset) but the same code path.
SMALL = TrainConfig(seed=0, generalist_epochs=8, specialist_epochs=10)
TEST_SUBSET = 200


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo does; restored for the tests that follow
    try:
        cache = tmp_path_factory.mktemp("cache")
        out = tmp_path_factory.mktemp("results")
        result = run_benchmark(DemoConfig(train=SMALL, test_subset=TEST_SUBSET, repeats=1, cache_dir=cache), log=None)
        report = write_report(result, out)
    finally:
        torch.set_num_threads(threads)
    return result, report, cache


def _reported(report_path):
    payload = json.loads((report_path.parent / "results.json").read_text())
    return {m["name"]: m for m in payload["methods"]}


def test_setting_specialist_wins_id_generalist_wins_ood(run):
    result, _, _ = run
    zs, ft = result.method("zero-shot"), result.method("fine-tuned")
    assert ft.id_accuracy > zs.id_accuracy
    assert zs.ood_average > ft.ood_average


def _method_names(alpha_val: float) -> list[str]:
    return [
        "zero-shot (generalist)",
        "fine-tuned (specialist)",
        "WiSE-FT α=0.5",
        f"WiSE-FT α={alpha_val:.1f} (ID val)",
        "output ensemble",
        "DaWin cluster-wise K=3",
        "DaWin exact per-sample",
        "DaWin selective",
        "AdaWiSE",
    ]


def test_every_method_ran_on_every_set(run):
    result, report, _ = run
    expected_sets = ["ID", *[name for name, _, _ in TEST_SHIFTS]]
    assert [m.name for m in result.methods] == _method_names(result.alpha_val)
    assert list(_reported(report)) == _method_names(result.alpha_val)
    for m in result.methods:
        assert m.available, (m.name, m.note)
        assert list(m.accuracy) == expected_sets, m.name
        assert m.n_samples == dict.fromkeys(expected_sets, TEST_SUBSET), m.name
        assert m.relative_cost > 0 and math.isfinite(m.relative_cost), m.name


def _entropy(z: torch.Tensor) -> torch.Tensor:
    return -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)


def _merge(alpha: float, a: dict, b: dict) -> dict:
    # num_batches_tracked is an integer buffer: taken from the first model (eval mode ignores it).
    return {k: (1 - alpha) * a[k] + alpha * b[k] if a[k].is_floating_point() else a[k] for k in a}


@torch.no_grad()
def test_reported_numbers_come_from_the_checkpoints(run):
    """Every row of results.json recomputed from the cached checkpoints without the package's methods: plain
    PyTorch merges by dict comprehension (per alpha, per cluster, per sample), lambda from plain entropies; the
    Beta-mixture EM and AdaWiSE's search come from the plain mirrors in ``dawin_ext.testing.reference_methods``."""
    from dawin_ext.testing.reference_methods import (
        adawise_reference,
        beta_mixture_reference,
        dawin_cluster_loop_reference,
    )

    result, report, _ = run
    reported = _reported(report)
    data = load_digits_splits(SMALL.seed, size=SMALL.image_size)
    sets = make_test_sets(data.x_test[:TEST_SUBSET], data.y_test[:TEST_SUBSET], SMALL.seed)
    gen_sd = load_file(str(result.pair.generalist_path))
    spec_sd = load_file(str(result.pair.specialist_path))
    model = build_model(SMALL.width).eval()

    def forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
        model.load_state_dict(sd)
        return model(x)

    def accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
        return float((scores.argmax(-1) == y).double().mean())

    # WiSE-FT's alpha chosen on the ID validation split: the best of 0, 0.1, ..., 1, the smallest on ties.
    xv, yv = normalize(data.x_val), data.y_val
    val = [(a / 10, accuracy(forward(_merge(a / 10, gen_sd, spec_sd), xv), yv)) for a in range(11)]
    alpha_val = min(a for a, acc in val if acc == max(acc for _, acc in val))
    assert result.alpha_val == alpha_val
    names = _method_names(alpha_val)

    for set_name, (x_raw, y) in sets.items():
        x = normalize(x_raw)
        zs, ft = forward(gen_sd, x), forward(spec_sd, x)
        h_zs, h_ft = _entropy(zs), _entropy(ft)
        lam = torch.exp(-h_ft) / (torch.exp(-h_zs) + torch.exp(-h_ft))  # weight on the specialist
        # DaWin as the demo runs it: the Beta mixture fitted on this set's lambda, then per cluster one merge.
        mix = beta_mixture_reference(lam.double().numpy(), n_mixtures=3, seed=SMALL.seed)
        cluster = dawin_cluster_loop_reference(model, gen_sd, spec_sd, [x], mix["labels"], mix["means"])
        exact = torch.cat([forward(_merge(float(lam[i]), gen_sd, spec_sd), x[i : i + 1]) for i in range(len(x))])
        # AdaWiSE as the demo runs it: the whole set as one batch, a fresh warm-start state, its defaults.
        _, ada = adawise_reference(model, gen_sd, spec_sd, [x], n_evals=8, n_init=3, seed=SMALL.seed)
        scores = {
            names[0]: zs,
            names[1]: ft,
            names[2]: forward(_merge(0.5, gen_sd, spec_sd), x),
            names[3]: forward(_merge(alpha_val, gen_sd, spec_sd), x),
            names[4]: 0.5 * F.softmax(zs, -1) + 0.5 * F.softmax(ft, -1),
            names[5]: cluster,
            names[6]: exact,
            names[7]: torch.where((h_zs > h_ft).unsqueeze(1), ft, zs),  # the lower-entropy model per sample
            names[8]: ada[0],
        }
        for method_name, s in scores.items():
            got = reported[method_name]["accuracy"][set_name]
            assert got == pytest.approx(accuracy(s, y), abs=1e-12), (method_name, set_name)


def test_report_files_and_table(run):
    result, report, _ = run
    text = report.read_text()
    for f in PLOT_FILES.values():
        assert (report.parent / f).stat().st_size > 1000
        assert f in text
    zs = result.method("zero-shot")
    assert f"{zs.id_accuracy:.3f}" in text
    assert result.environment["torch"] in text


def test_cache_is_reused_and_training_is_deterministic(run, tmp_path):
    result, _, cache = run
    data = load_digits_splits(SMALL.seed, size=SMALL.image_size)
    again = train_pair(data, SMALL, cache)
    assert again.from_cache
    assert again.generalist_path == result.pair.generalist_path
    fresh = train_pair(data, SMALL, tmp_path)
    assert not fresh.from_cache
    for a, b in ((result.pair.generalist, fresh.generalist), (result.pair.specialist, fresh.specialist)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", sorted(SHIFTS))
def test_shifts_keep_shape_range_and_are_seeded(family):
    x = load_digits_splits(0).x_test[:32]
    strength = {name: s for name, fam, s in TEST_SHIFTS if fam == family}.get(family) or next(
        s for _, fam, s in TEST_SHIFTS if fam == family
    )
    a = apply_shift(x, family, strength, torch.Generator().manual_seed(3))
    b = apply_shift(x, family, strength, torch.Generator().manual_seed(3))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, x)
    assert torch.equal(x, load_digits_splits(0).x_test[:32])  # input untouched


def test_full_inversion_is_one_minus_x():
    x = load_digits_splits(0).x_test[:8]
    assert torch.allclose(apply_shift(x, "contrast_inversion", 1.0, torch.Generator()), 1.0 - x)


def test_unknown_shift_is_named():
    with pytest.raises(KeyError, match="swirl"):
        apply_shift(torch.zeros(1, 1, 16, 16), "swirl", 1.0, torch.Generator())


def test_results_section_rewrites_only_its_markers(run, tmp_path):
    result, report, _ = run
    md = tmp_path / "RESULTS.md"
    md.write_text("# results\n\n## Kernels, CPU\n\nkernel table kept as is\n")
    update_results_section(result, md, report.parent, "dawin-ext demo --out x", 12.5)
    first = md.read_text()
    update_results_section(result, md, report.parent, "dawin-ext demo --out x", 12.5)
    assert md.read_text() == first
    assert first.count(SECTION_BEGIN) == 1 and first.count(SECTION_END) == 1
    assert "## Kernels, CPU\n\nkernel table kept as is\n" in first
    assert results_table(result) in first
