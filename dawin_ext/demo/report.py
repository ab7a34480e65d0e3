"""The demo's report: a console table, ``results/report.md`` and three PNG plots (matplotlib, Agg backend).

Every figure in the report is read from a :class:`~dawin_ext.demo.runner.DemoResult`; nothing is typed by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .data import GENERALIST_FAMILIES, TEST_SHIFTS
from .runner import DemoResult

__all__ = ["results_table", "write_report", "PLOT_FILES"]

PLOT_FILES = {
    "curve": "wise_ft_curve.png",
    "lambda": "lambda_histogram.png",
    "per_shift": "accuracy_per_shift.png",
}


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def results_table(result: DemoResult) -> str:
    """The methods table in GitHub markdown (also readable as plain text)."""
    shifts = result.set_names[1:]
    head = ["method", "ID", *shifts, "OOD avg", "rel. cost"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for m in result.methods:
        if not m.available:
            lines.append("| " + " | ".join([m.name, "n/a", *["n/a"] * len(shifts), "n/a", "n/a"]) + " |")
            continue
        row = [m.name, _fmt(m.id_accuracy), *[_fmt(m.accuracy[s]) for s in shifts], _fmt(m.ood_average)]
        row.append(f"{m.relative_cost:.1f}×")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _plot_curve(result: DemoResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    def ood(acc: dict[str, float]) -> float:
        return float(np.mean([v for k, v in acc.items() if k != "ID"]))

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs = [acc["ID"] for _, acc in result.curve]
    ys = [ood(acc) for _, acc in result.curve]
    ax.plot(xs, ys, "-", color="0.6", zorder=1, label="WiSE-FT α = 0 … 1")
    for (a, _), x, y in zip(result.curve, xs, ys, strict=True):
        ax.scatter([x], [y], s=12, color="0.4", zorder=2)
        ax.annotate(f"{a:.1f}", (x, y), textcoords="offset points", xytext=(3, -9), fontsize=7, color="0.4")
    markers = "os^vD<>pPX*h"
    for i, m in enumerate(r for r in result.methods if r.available):
        ax.scatter([m.id_accuracy], [m.ood_average], s=55, marker=markers[i % len(markers)], zorder=3, label=m.name)
    ax.set_xlabel("ID accuracy")
    ax.set_ylabel(f"OOD accuracy (mean over {len(result.set_names) - 1} shifted sets)")
    ax.set_title("ID vs OOD: the WiSE-FT curve and every method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_lambda(result: DemoResult, path: Path) -> None:
    import matplotlib.pyplot as plt
    from scipy.stats import beta as beta_dist

    names = result.set_names
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    grid = np.linspace(1e-3, 1 - 1e-3, 400)
    for ax, name in zip(axes.flat, names, strict=False):
        fit = result.lambda_fits[name]
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        if fit.lambdas.size == 0:
            ax.text(0.5, 0.5, fit.note or "no λ", ha="center", va="center", fontsize=7, wrap=True)
            continue
        ax.hist(fit.lambdas, bins=40, range=(0, 1), density=True, color="tab:blue", alpha=0.5)
        mix = fit.mixture
        if mix is not None:
            total = np.zeros_like(grid)
            for w, a, b in zip(mix.weights_, mix.alphas_, mix.betas_, strict=True):
                comp = w * beta_dist.pdf(grid, a, b)
                total += comp
                ax.plot(grid, comp, "--", lw=0.8, color="tab:orange")
            ax.plot(grid, total, "-", lw=1.4, color="tab:red")
            top = np.percentile(total, 99)
            hist_top = np.histogram(fit.lambdas, bins=40, range=(0, 1), density=True)[0].max()
            ax.set_ylim(0, 1.1 * max(hist_top, min(top, 3 * hist_top)))
            for mu in mix.means_:
                ax.axvline(mu, color="k", lw=0.6, alpha=0.6)
        else:
            ax.text(0.5, 0.9, fit.note, ha="center", va="top", fontsize=6, transform=ax.transAxes, wrap=True)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("DaWin λ (weight on the specialist) per set; red: fitted Beta mixture (K=3), lines: cluster means")
    fig.supxlabel("λ")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_per_shift(result: DemoResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    methods = [m for m in result.methods if m.available]
    names = result.set_names
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(names)), 4.6))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(names))
    for i, m in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [m.accuracy[n] for n in names], width, label=m.name)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    ax.set_title("Accuracy per evaluation set and method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _setting_lines(result: DemoResult) -> list[str]:
    tc = result.config.train
    n_test = {m.name: m.n_samples for m in result.methods if m.available}
    sizes = next(iter(n_test.values()), {})
    fam = ", ".join(f"{k} {lo:g}–{hi:g}" for k, (lo, hi) in GENERALIST_FAMILIES.items())
    shifts = ", ".join(f"{name} ({family} {strength:g})" for name, family, strength in TEST_SHIFTS)
    return [
        f"- Seed {tc.seed}; {tc.image_size}×{tc.image_size} scikit-learn digits; small CNN, width {tc.width}.",
        f"- Generalist: {tc.generalist_epochs} epochs from scratch (lr {tc.generalist_lr:g}) on augmented "
        f"training digits (families and strengths: {fam}).",
        f"- Specialist: the generalist fine-tuned {tc.specialist_epochs} epochs (lr {tc.specialist_lr:g}) on "
        "the clean training digits only.",
        f"- Test sets ({', '.join(f'{k}: {v}' for k, v in sizes.items())} images): ID, and {shifts}. "
        "Occlusion and elastic distortion were seen by neither model; every shift is new to the specialist.",
        f"- WiSE-FT α chosen on the ID validation split ({result.n_val} images): {result.alpha_val:g}.",
        "- Relative cost: a method's median wall time over all test sets (including both models' logits, λ, "
        "mixture fitting and merging where the method needs them) divided by one plain forward pass of one model "
        f"over the same sets; medians of {result.config.repeats} runs after a warm-up in this process (a method "
        "whose first run takes 0.5 s or more on a set is timed by that run alone).",
    ]


def write_report(result: DemoResult, out_dir: Path, bench_table: str | None = None) -> Path:
    """Writes ``report.md``, ``results.json`` and the three plots into ``out_dir``; returns the report path."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_curve(result, out_dir / PLOT_FILES["curve"])
    _plot_lambda(result, out_dir / PLOT_FILES["lambda"])
    _plot_per_shift(result, out_dir / PLOT_FILES["per_shift"])

    env = result.environment
    missing = [m for m in result.methods if not m.available]
    lines = ["# dawin-ext embedded digits benchmark", "", "## Results", "", results_table(result), ""]
    if missing:
        lines += ["Methods without numbers:", ""] + [f"- {m.name}: {m.note}" for m in missing] + [""]
    detailed = [m for m in result.methods if m.available and m.details]
    for m in detailed:
        lines += [f"{m.name}, per set:", ""] + [f"- {k}: {v}" for k, v in m.details.items()] + [""]
    lines += ["## Setting", "", *_setting_lines(result), ""]
    lines += ["## WiSE-FT α curve", "", "| α | ID | OOD avg |", "|---:|---:|---:|"]
    for a, acc in result.curve:
        ood = float(np.mean([v for k, v in acc.items() if k != "ID"]))
        lines.append(f"| {a:.1f} | {acc['ID']:.3f} | {ood:.3f} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{k}]({v})" for k, v in PLOT_FILES.items()]
    lines += ["", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- wall time, {k}: {v:.1f} s" for k, v in result.seconds.items()]
    lines.append(
        f"- models {'loaded from the cache' if result.pair.from_cache else 'trained in this run'}: "
        f"{result.pair.generalist_path.parent}"
    )
    if bench_table:
        lines += ["", "## Kernel and pipeline speed (`dawin-ext bench --quick`)", "", bench_table]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")

    payload = {
        "alpha_val": result.alpha_val,
        "methods": [
            {
                "name": m.name,
                "available": m.available,
                "note": m.note,
                "accuracy": m.accuracy,
                "n_samples": m.n_samples,
                "ood_average": m.ood_average if m.available else None,
                "relative_cost": m.relative_cost if m.available else None,
            }
            for m in result.methods
        ],
        "wise_ft_curve": [{"alpha": a, "accuracy": acc} for a, acc in result.curve],
        "environment": {k: (v if isinstance(v, (str, int, float, dict)) else str(v)) for k, v in env.items()},
        "seconds": result.seconds,
        "checkpoints": {"generalist": str(result.pair.generalist_path), "specialist": str(result.pair.specialist_path)},
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    return report
