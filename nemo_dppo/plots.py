"""Plots and a Markdown report of a run's `metrics.jsonl` (one run, or several overlaid, e.g. DPPO vs GRPO).

    plot_run("runs/dppo")                          # → runs/dppo/plots/{reward,mismatch,mask,time}.png
    plot_runs(["runs/dppo", "runs/grpo"])          # → runs/dppo/plots/compare/*.png
    write_report("runs/dppo")                      # → runs/dppo/report.md (runs plot_run first)

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global backend
switch). A metric missing from every step is skipped (its curve, its panel's "no data", or the whole figure).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nemo_dppo.run_logger import METRICS_FILE, read_metrics

PLOTS_DIR = "plots"
REPORT_FILE = "report.md"

REWARD = "reward/mean"
TRAIN_ACCURACY = "reward/accuracy"
EVAL_ACCURACY = "eval/accuracy"
KL_K3 = "mismatch/kl_k3"
ABS_PROB_DIFF = "mismatch/abs_prob_diff_mean"
ROUTING = "routing/disagreement"
MASK_FRACS = {"loss/mask_frac": "all", "loss/mask_frac_pos": "A > 0", "loss/mask_frac_neg": "A < 0"}
STEP_TIME = "time/step"
TIME_PREFIX = "time/"
#: Phases in pipeline order (stack order of the time plot); phases not listed follow, sorted by name.
PHASE_ORDER = ("time/rollout", "time/logprob", "time/train", "time/sync")

#: Dotted config keys shown in the report (those present in config.yaml; every `loss.*` key is shown too).
KEY_HYPERPARAMETERS = (
    "steps",
    "seed",
    "advantage.estimator",
    "train.lr",
    "train.prompts_per_step",
    "train.mini_batches",
    "train.grad_clip",
    "train.backend",
    "train.precision",
    "rollout.engine",
    "rollout.dtype",
    "rollout.n",
    "rollout.temperature",
    "rollout.router_replay",
    "model.path",
)


@dataclass
class Run:
    """One run's metrics (sorted by step, last record wins on a repeated step) and config."""

    run_dir: Path
    records: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def label(self) -> str:
        """`loss.mode (dir name)`, or the dir name when the config has no loss mode."""
        mode = _config_get(self.config, "loss.mode")
        return f"{mode} ({self.run_dir.name})" if mode else self.run_dir.name

    def keys(self) -> set[str]:
        return {key for record in self.records for key in record}

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the steps where `key` has a finite value."""
        points = [(r["step"], r.get(key)) for r in self.records]
        points = [(s, float(v)) for s, v in points if v is not None and math.isfinite(float(v))]
        if not points:
            return np.empty(0), np.empty(0)
        steps, values = zip(*points, strict=True)
        return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _config_get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    """Read a run dir; one-line FileNotFoundError (no dir / no metrics.jsonl) or ValueError (no records)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / METRICS_FILE} has no metrics (empty file)")
    if any("step" not in r for r in records):
        raise ValueError(f"{run_dir / METRICS_FILE} has a record without a 'step' key")
    by_step = {r["step"]: r for r in records}
    config: dict[str, Any] = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{config_path} is not valid YAML: {str(err).splitlines()[0]}") from None
        config = loaded if isinstance(loaded, dict) else {}
    return Run(run_dir, [by_step[s] for s in sorted(by_step)], config)


# --------------------------------------------------------------------------------------------------- drawing


def _new_figure(panels: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(5.5 * panels, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _line(ax: Axes, run: Run, key: str, label: str, color: str | None = None, log: bool = False, **kw: Any) -> bool:
    """Plot `key` vs step (only positive values when `log`); False when there is nothing to draw."""
    steps, values = run.series(key)
    if log:
        steps, values = steps[values > 0], values[values > 0]
    if not len(values):
        return False
    marker = "o" if len(values) <= 20 else None
    ax.plot(steps, values, label=label, color=color, marker=marker, markersize=3, **kw)
    return True


def _finish(ax: Axes, title: str, drawn: bool, log: bool = False) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize="small")


def _save(fig: Figure, any_drawn: bool, path: Path, written: list[Path]) -> None:
    if any_drawn:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        written.append(path)


def _phase_keys(runs: Sequence[Run]) -> list[str]:
    keys = set().union(*(run.keys() for run in runs))
    phases = [k for k in keys if k.startswith(TIME_PREFIX) and k != STEP_TIME]
    return sorted(phases, key=lambda k: (PHASE_ORDER.index(k) if k in PHASE_ORDER else len(PHASE_ORDER), k))


def _draw_single(run: Run, out_dir: Path) -> list[Path]:
    written: list[Path] = []

    fig, (ax_r, ax_a) = _new_figure(2)
    drawn_r = _line(ax_r, run, REWARD, "reward mean")
    _finish(ax_r, "Reward", drawn_r)
    drawn_a = _line(ax_a, run, EVAL_ACCURACY, "eval")
    drawn_a |= _line(ax_a, run, TRAIN_ACCURACY, "train (rollouts)", alpha=0.6)
    _finish(ax_a, "Accuracy", drawn_a)
    _save(fig, drawn_r or drawn_a, out_dir / "reward.png", written)

    fig, (ax_m, ax_d) = _new_figure(2)
    drawn_m = _line(ax_m, run, KL_K3, "KL(μ‖π) k3", log=True)
    drawn_m |= _line(ax_m, run, ABS_PROB_DIFF, "mean |π − μ|", log=True)
    _finish(ax_m, "Training–inference mismatch", drawn_m, log=True)
    drawn_d = _line(ax_d, run, ROUTING, "routing disagreement")
    _finish(ax_d, "MoE routing disagreement", drawn_d)
    _save(fig, drawn_m or drawn_d, out_dir / "mismatch.png", written)

    fig, (ax,) = _new_figure(1)
    drawn = False
    for key, label in MASK_FRACS.items():
        drawn |= _line(ax, run, key, label)
    _finish(ax, "Masked token fraction", drawn)
    _save(fig, drawn, out_dir / "mask.png", written)

    fig, (ax,) = _new_figure(1)
    phases = [key for key in _phase_keys([run]) if len(run.series(key)[0])]
    steps = np.asarray([r["step"] for r in run.records], dtype=float)
    if phases:  # stacked; a phase missing at a step counts as 0 s there
        stacks = [[_as_float(r.get(key)) for r in run.records] for key in phases]
        ax.stackplot(steps, np.nan_to_num(np.asarray(stacks)), labels=[k[len(TIME_PREFIX) :] for k in phases])
    drawn = bool(phases)
    drawn |= _line(ax, run, STEP_TIME, "step (total)", color="black", linestyle="--")
    ax.set_ylabel("seconds")
    _finish(ax, "Time per phase", drawn)
    _save(fig, drawn, out_dir / "time.png", written)
    return written


def _draw_overlay(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    written: list[Path] = []
    colors = [f"C{i % 10}" for i in range(len(runs))]

    def overlay(name: str, panels: list[tuple[str, str, bool]]) -> None:
        fig, axes = _new_figure(len(panels))
        any_drawn = False
        for ax, (key, title, log) in zip(axes, panels, strict=True):
            drawn = False
            for run, color in zip(runs, colors, strict=True):
                drawn |= _line(ax, run, key, run.label, color=color, log=log)
            _finish(ax, title, drawn, log=log)
            any_drawn |= drawn
        _save(fig, any_drawn, out_dir / name, written)

    overlay("reward.png", [(REWARD, "Reward mean", False), (EVAL_ACCURACY, "Eval accuracy", False)])
    overlay(
        "mismatch.png",
        [
            (KL_K3, "Mismatch KL(μ‖π) k3", True),
            (ABS_PROB_DIFF, "Mismatch mean |π − μ|", True),
            (ROUTING, "Routing disagreement", False),
        ],
    )
    overlay("mask.png", [(key, f"Masked fraction ({label})", False) for key, label in MASK_FRACS.items()])
    overlay("time.png", [(STEP_TIME, "Time per step (s)", False)])
    return written


def plot_run(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write reward / mismatch / mask / time PNGs into RUN_DIR/plots/; returns the files written."""
    run = load_run(run_dir)
    return _draw_single(run, run.run_dir / PLOTS_DIR)


def plot_runs(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Overlay several runs (label `loss.mode (dir)`) into `out_dir` (default: FIRST_RUN/plots/compare/)."""
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run dir")
    runs = [load_run(d) for d in run_dirs]  # validate every dir before writing anything
    target = Path(out_dir) if out_dir is not None else runs[0].run_dir / PLOTS_DIR / "compare"
    return _draw_overlay(runs, target)


# --------------------------------------------------------------------------------------------------- report


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _reward_summary(run: Run) -> list[str]:
    _, reward = run.series(REWARD)
    if not len(reward):
        return []
    first, last = reward[:3].mean(), reward[-3:].mean()
    return [f"| reward/mean, first 3 → last 3 steps | {_fmt(first)} → {_fmt(last)} (Δ {_fmt(last - first)}) |"]


def _eval_summary(run: Run) -> list[str]:
    steps, acc = run.series(EVAL_ACCURACY)
    if not len(acc):
        return []
    best = int(np.argmax(acc))
    return [
        f"| eval/accuracy, best | {_fmt(acc[best])} (step {int(steps[best])}) |",
        f"| eval/accuracy, last | {_fmt(acc[-1])} (step {int(steps[-1])}) |",
    ]


def _mean_rows(run: Run, keys: Sequence[str]) -> list[str]:
    rows = []
    for key in keys:
        _, values = run.series(key)
        if len(values):
            rows.append(f"| {key}, mean | {_fmt(values.mean())} |")
    return rows


def _time_rows(run: Run) -> list[str]:
    _, step_time = run.series(STEP_TIME)
    phases = {key: run.series(key)[1].sum() for key in _phase_keys([run])}
    total = step_time.sum() if len(step_time) else sum(phases.values())
    if not len(step_time) and not phases:
        return []
    rows = [f"| time, total | {total:.1f} s ({total / len(run.records):.2f} s/step) |"]
    for key, seconds in phases.items():
        share = f", {100 * seconds / total:.0f}%" if total > 0 else ""
        rows.append(f"| {key}, total | {seconds:.1f} s{share} |")
    return rows


def _config_rows(config: dict[str, Any]) -> list[str]:
    loss = config.get("loss") if isinstance(config.get("loss"), dict) else {}
    items = [(f"loss.{key}", value) for key, value in loss.items() if value is not None]
    items += [(key, _config_get(config, key)) for key in KEY_HYPERPARAMETERS]
    return [f"| {key} | {value} |" for key, value in items if value is not None]


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write RUN_DIR/report.md: config summary, reward / eval / mismatch / mask / time numbers and the plots."""
    run = load_run(run_dir)
    pngs = _draw_single(run, run.run_dir / PLOTS_DIR)
    first_step, last_step = run.records[0]["step"], run.records[-1]["step"]
    mode = _config_get(run.config, "loss.mode") or "unknown (no config.yaml)"

    lines = [f"# Run report: {run.run_dir.name}", "", f"Loss mode: **{mode}**", ""]
    config_rows = _config_rows(run.config)
    if config_rows:
        lines += ["## Config", "", "| key | value |", "|---|---|", *config_rows, ""]
    summary = [
        f"| steps logged | {len(run.records)} (step {first_step} → {last_step}) |",
        *_reward_summary(run),
        *_eval_summary(run),
        *_mean_rows(run, [KL_K3, "mismatch/kl_k1", ABS_PROB_DIFF, ROUTING]),
        *_mean_rows(run, list(MASK_FRACS)),
        *_time_rows(run),
    ]
    lines += ["## Summary", "", "| metric | value |", "|---|---|", *summary, ""]
    if pngs:
        lines += ["## Plots", ""]
        lines += [f"![{png.stem}]({png.relative_to(run.run_dir).as_posix()})\n" for png in pngs]
    path = run.run_dir / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
