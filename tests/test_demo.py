"""The embedded digits benchmark at reduced size: the setting's basic facts, and that the report comes from the run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dawin_ext.demo.data import SHIFTS, TEST_SHIFTS, apply_shift, load_digits_splits, make_test_sets, normalize
from dawin_ext.demo.model import build_model
from dawin_ext.demo.report import (
    PLOT_FILES,
    SECTION_BEGIN,
    SECTION_END,
    results_table,
    update_results_section,
    write_report,
)
from dawin_ext.demo.runner import DemoConfig, run_benchmark
from dawin_ext.demo.train import TrainConfig, load_state_dict_file, train_pair
from dawin_ext.reference import interpolation_reference

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


def test_every_method_accuracy_in_unit_interval_on_stated_samples(run):
    result, _, _ = run
    expected_sets = ["ID", *[name for name, _, _ in TEST_SHIFTS]]
    assert len(expected_sets) >= 6
    available = [m for m in result.methods if m.available]
    assert len(available) >= 5
    for m in available:
        assert list(m.accuracy) == expected_sets, m.name
        for name in expected_sets:
            assert m.n_samples[name] == TEST_SUBSET, (m.name, name)
            acc = m.accuracy[name]
            assert 0.0 <= acc <= 1.0, (m.name, name, acc)
            # An accuracy over n samples is a multiple of 1/n.
            assert math.isclose(acc * TEST_SUBSET, round(acc * TEST_SUBSET), abs_tol=1e-6), (m.name, name)
        assert m.relative_cost > 0 and math.isfinite(m.relative_cost)
    for m in result.methods:
        if not m.available:
            assert m.note.startswith("not available"), m.name


def test_reported_numbers_come_from_the_checkpoints(run):
    """Re-evaluate the cached checkpoints independently (plain PyTorch merge) and compare with results.json."""
    result, report, _ = run
    reported = _reported(report)
    data = load_digits_splits(SMALL.seed, size=SMALL.image_size)
    sets = make_test_sets(data.x_test[:TEST_SUBSET], data.y_test[:TEST_SUBSET], SMALL.seed)
    gen_sd = load_state_dict_file(result.pair.generalist_path)
    spec_sd = load_state_dict_file(result.pair.specialist_path)
    merged = interpolation_reference(0.5, gen_sd, spec_sd)
    # num_batches_tracked is an integer buffer: keep it (eval mode ignores it).
    merged = {k: (v.to(gen_sd[k].dtype) if not gen_sd[k].is_floating_point() else v) for k, v in merged.items()}
    for method_name, sd in (
        ("zero-shot (generalist)", gen_sd),
        ("fine-tuned (specialist)", spec_sd),
        ("WiSE-FT α=0.5", merged),
    ):
        model = build_model(SMALL.width)
        model.load_state_dict(sd)
        model.eval()
        with torch.no_grad():
            for set_name, (x, y) in sets.items():
                acc = float((model(normalize(x)).argmax(-1) == y).double().mean())
                assert reported[method_name]["accuracy"][set_name] == pytest.approx(acc, abs=1e-12), (
                    method_name,
                    set_name,
                )


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
