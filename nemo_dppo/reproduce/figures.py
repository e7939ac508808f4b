"""One PNG per experiment in the paper's layout: a row per learning rate, a column per panel (training accuracy
with the mean and min–max band over seeds; mismatch on a log scale; bad updates, clipped-token μ / entropy)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from nemo_dppo.reproduce.analysis import GroupSummary, moving_average
from nemo_dppo.reproduce.experiments import Experiment

PANELS = {
    "accuracy": ("training accuracy", False),
    "mismatch": ("mismatch k3 KL(μ‖π)", True),
    "bad_updates": ("bad updates (A<0, μ−π ≥ 0.5)", False),
    "dropped_mu": ("μ of clipped tokens", False),
    "dropped_entropy": ("entropy of clipped tokens", False),
    "entropy": ("policy entropy", False),
}
SMOOTH = 5


def plot_experiment(experiment: Experiment, groups: dict[tuple[str, float], GroupSummary], out: Path) -> Path:
    lrs = sorted(lr for lr in experiment.learning_rates if any(k[1] == lr for k in groups))
    rows, cols = max(len(lrs), 1), len(experiment.panels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for r, lr in enumerate(lrs):
        for c, panel in enumerate(experiment.panels):
            ax = axes[r][c]
            title, log = PANELS[panel]
            for i, method in enumerate(experiment.methods):
                group = groups.get((method.name, lr))
                if group is not None:
                    _band(ax, group, panel, method.label, f"C{i}")
            ax.set_title(f"{title} — lr {lr:g}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if log:
                ax.set_yscale("log")
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.suptitle(f"{experiment.figure}: {experiment.title}", fontsize=10)
    fig.tight_layout()
    path = out / f"{experiment.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _band(ax, group: GroupSummary, panel: str, label: str, color: str) -> None:
    curves = []
    for run in group.runs:
        values = [v for v in run.series[panel]]
        if panel != "mismatch":
            values = _smooth(values)
        curves.append(dict(zip(run.series["step"], values, strict=True)))
    steps = sorted({s for c in curves for s in c})
    if not steps:
        return
    columns = [[c[s] for c in curves if s in c and not math.isnan(c[s])] for s in steps]
    keep = [i for i, col in enumerate(columns) if col and (panel != "mismatch" or min(col) > 0)]
    if not keep:
        return
    xs = [steps[i] for i in keep]
    mean = [sum(columns[i]) / len(columns[i]) for i in keep]
    ax.plot(xs, mean, color=color, label=label, linewidth=1.2)
    ax.fill_between(xs, [min(columns[i]) for i in keep], [max(columns[i]) for i in keep], color=color, alpha=0.15)


def _smooth(values: list[float]) -> list[float]:
    """Moving average over SMOOTH steps, NaN-skipping (NaN where the whole window is NaN)."""
    finite = [0.0 if math.isnan(v) else v for v in values]
    counts = moving_average([0.0 if math.isnan(v) else 1.0 for v in values], SMOOTH)
    sums = moving_average(finite, SMOOTH)
    return [s / c if c > 0 else math.nan for s, c in zip(sums, counts, strict=True)]
