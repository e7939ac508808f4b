"""`report.md` of a sweep: a table per experiment, the most frequently clipped tokens, the verdicts and rules."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from nemo_dppo.reproduce import analysis
from nemo_dppo.reproduce.analysis import GroupSummary, Verdict
from nemo_dppo.reproduce.experiments import Experiment
from nemo_dppo.step_metrics import read_dropped_tokens


def _f(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _g(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.2e}"


def experiment_table(experiment: Experiment, groups: dict[tuple[str, float], GroupSummary]) -> list[str]:
    extra = {"bad_updates": ("bad-update frac", "bad_updates"), "dropped_mu": ("clipped μ", "dropped_mu"),
             "dropped_entropy": ("clipped entropy", "dropped_entropy")}  # fmt: skip
    columns = [extra[p] for p in experiment.panels if p in extra]
    head = "| method | lr | final train acc (mean ± sd) | min–max | peak mismatch k3 | collapsed (first step) |"
    head += "".join(f" {name} |" for name, _ in columns)
    lines = [head, "|" + "---|" * (6 + len(columns))]
    for lr in sorted(lr for lr in experiment.learning_rates if any(k[1] == lr for k in groups)):
        for method in experiment.methods:
            g = groups.get((method.name, lr))
            if g is None:
                continue
            first = f" ({g.first_collapse})" if g.first_collapse is not None else ""
            row = (f"| {method.label} | {lr:g} | {_f(g.final_mean)} ± {_f(g.final_sd)} | {_f(min(g.final))}–"
                   f"{_f(max(g.final))} | {_g(g.peak_mismatch)} | {g.collapsed}/{len(g.runs)}{first} |")
            row += "".join(f" {_f(g.mean_series(series), 4)} |" for _, series in columns)
            lines.append(row)
    return lines


def top_dropped(run_dirs: list[Path], n: int = 12) -> str:
    total: Counter = Counter()
    for run_dir in run_dirs:
        for record in read_dropped_tokens(run_dir):
            total.update(record["counts"])
    return ", ".join(f"`{tok!s}` {count}" for tok, count in total.most_common(n)) or "none"


def write_report(out: Path, experiments: list[Experiment], groups: dict, verdicts: list[Verdict],
                 run_dirs: dict[tuple[str, float], list[Path]], header: list[str]) -> Path:  # fmt: skip
    lines = ["# nemo-dppo reproduce — the paper's claims at toy scale", "", *header, "",
             "## Rules", "",
             f"- final training accuracy: mean rollout accuracy of the last {analysis.FINAL_WINDOW} steps "
             "(a run stopped by a non-finite loss scores 0 for its missing steps);",
             "- peak mismatch: the largest per-step k3 estimate of KL(μ‖π) (training engine fp32 vs the bf16 "
             "rollout engine, on the rollout's own weights);",
             f"- collapse: the first step where the {analysis.SMOOTH}-step moving average of training accuracy is "
             f"below half its running peak (once that peak reached {analysis.MIN_PEAK});",
             f"- a difference counts only beyond the pooled sd over seeds and {analysis.MARGIN}; a verdict is "
             "*reproduced* with evidence for and none against, *not reproduced* with none for, else "
             "*inconclusive*.", ""]  # fmt: skip
    for experiment in experiments:
        lines += [f"## {experiment.name} — {experiment.figure}: {experiment.title}", "",
                  f"![{experiment.name}]({experiment.name}.png)", "", *experiment_table(experiment, groups), ""]
    lines += ["## Most frequently clipped tokens (Appendix E)", ""]
    for method in ("grpo_clip_higher", "dppo_binary_tv", "dppo_binary_kl"):
        for (m, lr), dirs in sorted(run_dirs.items()):
            if m == method:
                lines.append(f"- {method} @ lr {lr:g}: {top_dropped(dirs)}")
    lines += ["", "## Verdicts", "", "| takeaway | verdict | rule | evidence |", "|---|---|---|---|"]
    lines += [f"| {v.takeaway} | **{v.verdict}** | {v.rule} | {v.evidence} |" for v in verdicts]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
