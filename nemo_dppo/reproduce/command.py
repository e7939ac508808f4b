"""`nemo-dppo reproduce [EXPERIMENT ...] [--seeds N] [--jobs J] [--quick] [--out DIR] [key=value ...]`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console

from nemo_dppo.config import CONF_DIR, load_config
from nemo_dppo.errors import UserError
from nemo_dppo.reproduce.analysis import GroupSummary, summarize_run
from nemo_dppo.reproduce.experiments import DEFAULT_LR, EXPERIMENTS, get_experiment
from nemo_dppo.reproduce.figures import plot_experiment
from nemo_dppo.reproduce.report import write_report
from nemo_dppo.reproduce.runner import Sweep, plan, read_outcome
from nemo_dppo.reproduce.verdicts import all_verdicts

CONFIG = CONF_DIR / "reproduce.yaml"
#: `--quick`: the machinery only (runs finish, plots and report are written, verdicts computed), not the science.
QUICK_OVERRIDES = ["steps=4", "eval_every=2", "save_every=2", "train.prompts_per_step=4", "rollout.n=4",
                   "train.mini_batches=2", "task.num_eval_prompts=16"]  # fmt: skip


def reproduce(names: list[str], seeds: int, jobs: int | None, quick: bool, out: Path, overrides: list[str]) -> Path:
    experiments = [get_experiment(n) for n in (names or list(EXPERIMENTS))]
    extra = [*(QUICK_OVERRIDES if quick else []), *overrides]
    cfg = load_config(CONFIG, extra)  # one-line error for a bad override, before anything runs
    console = Console(stderr=True)
    specs = plan(experiments, 1 if quick else seeds, (DEFAULT_LR,) if quick else None)
    sweep = Sweep(out, CONFIG, extra, cfg.steps, jobs or os.cpu_count() or 1, console)
    todo = sweep.pending(specs)
    minutes = sweep.estimate_seconds(specs, todo) / 60
    console.print(f"reproduce: {len(specs)} runs ({len(specs) - len(todo)} already finished), {sweep.jobs} at a "
                  f"time, one thread each; estimated {minutes:.1f} min → {out}")  # fmt: skip
    from nemo_dppo.trainer import Trainer

    start = time.perf_counter()
    Trainer.initial_model_dir(cfg)  # the shared warm start (and curated set), once, before the runs start
    sweep.run(todo)
    run_seconds = 0.0
    groups: dict[tuple[str, float], GroupSummary] = {}
    dirs: dict[tuple[str, float], list[Path]] = {}
    for spec in specs:
        run_dir = sweep.run_dir(spec)
        outcome = read_outcome(run_dir) or {"status": "missing"}
        run_seconds += float(outcome.get("seconds", 0.0))
        summary = summarize_run(run_dir, spec.method.name, spec.lr, spec.seed, outcome["status"], cfg.steps)
        groups.setdefault((spec.method.name, spec.lr), GroupSummary(spec.method.name, spec.lr, [])).runs.append(summary)
        dirs.setdefault((spec.method.name, spec.lr), []).append(run_dir)
    for experiment in experiments:
        plot_experiment(experiment, groups, out)
    header = [f"{len(specs)} runs, {1 if quick else seeds} seed(s), {cfg.steps} steps each, config "
              f"`conf/reproduce.yaml` + `{' '.join(extra) or 'no overrides'}`; the runs took {run_seconds / 60:.0f} "
              f"min of wall time in all (run side by side, {sweep.jobs} at a time, one thread each); this call "
              f"{(time.perf_counter() - start) / 60:.1f} min."]  # fmt: skip
    if quick:
        header.append("**--quick**: 4 steps per run; this checks the machinery, not the science.")
    report = write_report(out, experiments, groups, all_verdicts(groups), dirs, header)
    console.print(f"report: {report}")
    return report


def check_args(seeds: int, jobs: int | None) -> None:
    if seeds < 1:
        raise UserError(f"--seeds={seeds} must be ≥ 1")
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs={jobs} must be ≥ 1")
