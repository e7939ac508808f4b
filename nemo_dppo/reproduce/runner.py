"""Runs of a reproduce sweep: one `nemo-dppo train` subprocess per (method, learning rate, seed), `jobs` at a
time with one torch thread each, resumable.

A finished run leaves `RUN_DIR/outcome.json` (`finished`, or `diverged` with the trainer's error line: a run the
loss stopped is a result, not a failure to retry) and is skipped next time; an unfinished one resumes from its
latest checkpoint. One progress bar counts the steps of the whole sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nemo_dppo.errors import UserError
from nemo_dppo.reproduce.experiments import Experiment, Method

OUTCOME_FILE = "outcome.json"
#: Seconds per RL step of one run at one thread on this project's 2-core reference machine (reproduce.yaml),
#: used for the estimate until runs of this sweep have finished.
PRIOR_SECONDS_PER_STEP = 0.9
STARTUP_SECONDS = 8.0


@dataclass(frozen=True)
class RunSpec:
    method: Method
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method.name}/lr{self.lr:g}_seed{self.seed}"

    def overrides(self) -> list[str]:
        return [*self.method.overrides, f"train.lr={self.lr:g}", f"seed={self.seed}"]


def plan(experiments: list[Experiment], seeds: int, learning_rates: tuple[float, ...] | None) -> list[RunSpec]:
    """The distinct runs of `experiments` (a run shared by two experiments is listed once)."""
    specs: dict[str, RunSpec] = {}
    for experiment in experiments:
        for lr in learning_rates or experiment.learning_rates:
            for method in experiment.methods:
                for seed in range(seeds):
                    spec = RunSpec(method, lr, seed)
                    specs.setdefault(spec.key, spec)
    return list(specs.values())


@contextmanager
def _stopped_on_error(running: dict) -> Iterator[None]:
    """Whatever stops the sweep (a failed run, Ctrl-C) also stops the runs still going; finished ones are kept."""
    try:
        yield
    except BaseException:
        for proc, _, log in running.values():
            proc.terminate()
            proc.wait()
            log.close()
        raise


def read_outcome(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / OUTCOME_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Sweep:
    """Runs `specs` under `out/runs/`, at most `jobs` at a time."""

    def __init__(self, out: Path, config: Path, extra: list[str], steps: int, jobs: int, console: Console) -> None:
        self.out, self.config, self.extra, self.steps, self.jobs = out, config, extra, steps, max(1, jobs)
        self.console = console

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.key

    def command(self, spec: RunSpec) -> list[str]:
        args = [*self.extra, *spec.overrides(), f"run_dir={self.run_dir(spec)}", "progress=false", "threads=1",
                "plots=false"]
        return [sys.executable, "-m", "nemo_dppo.cli", "train", str(self.config), *args]

    def pending(self, specs: list[RunSpec]) -> list[RunSpec]:
        """Runs without an outcome for exactly this command (a changed command starts the run afresh)."""
        todo = []
        for spec in specs:
            outcome = read_outcome(self.run_dir(spec))
            if outcome is not None and outcome.get("command") == self.command(spec)[3:]:
                continue
            if outcome is not None:
                shutil.rmtree(self.run_dir(spec), ignore_errors=True)
            todo.append(spec)
        return todo

    def estimate_seconds(self, specs: list[RunSpec], todo: list[RunSpec]) -> float:
        """Wall time of `todo`: measured seconds per step of this sweep's finished runs, else the prior."""
        done = [read_outcome(self.run_dir(s)) for s in specs if s not in todo]
        per_step = [o["seconds"] / max(o["steps"], 1) for o in done if o and o.get("steps")]
        seconds_per_step = sum(per_step) / len(per_step) if per_step else PRIOR_SECONDS_PER_STEP
        work = len(todo) * (self.steps * seconds_per_step + STARTUP_SECONDS)
        return work / min(self.jobs, max(len(todo), 1))

    def run(self, todo: list[RunSpec]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        queue, running = list(todo), {}
        columns = (TextColumn("[bold]reproduce"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                   TextColumn("{task.fields[runs]}"), TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
        with Progress(*columns, console=self.console) as bar, _stopped_on_error(running):
            task = bar.add_task("sweep", total=len(todo) * self.steps, runs="")
            while queue or running:
                while queue and len(running) < self.jobs:
                    spec = queue.pop(0)
                    running[spec] = self._start(spec, env)
                for spec, (proc, started, log) in list(running.items()):
                    if proc.poll() is not None:
                        log.close()
                        self._finish(spec, proc.returncode, time.perf_counter() - started)
                        del running[spec]
                done = sum(self._steps_done(s) for s in todo)
                runs = f"{len(todo) - len(queue) - len(running)}/{len(todo)} runs done, {len(running)} running"
                bar.update(task, completed=done, runs=runs)
                time.sleep(0.5)

    def _start(self, spec: RunSpec, env: dict[str, str]) -> tuple[subprocess.Popen, float, object]:
        run_dir = self.run_dir(spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        command = self.command(spec)
        if (run_dir / "checkpoints" / "latest").is_file():
            command.append("resume=true")
        log = (run_dir / "train.log").open("a", encoding="utf-8")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return proc, time.perf_counter(), log

    def _finish(self, spec: RunSpec, code: int, seconds: float) -> None:
        run_dir = self.run_dir(spec)
        lines = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        if code == 0:
            status = "finished"
        elif errors and any(w in errors[-1] for w in ("NaN", "nan", "inf", "step not applied")):
            status = "diverged"  # the trainer refused a non-finite loss or gradient: the run collapsed
        else:
            tail = errors[-1] if errors else (lines[-1] if lines else f"exit code {code}")
            raise UserError(f"reproduce: run {spec.key} failed ({tail}); its log: {run_dir / 'train.log'}")
        outcome = {"status": status, "error": errors[-1] if errors and status != "finished" else None,
                   "seconds": seconds, "steps": self._steps_done(spec), "command": self.command(spec)[3:]}  # fmt: skip
        (run_dir / OUTCOME_FILE).write_text(json.dumps(outcome, indent=1), encoding="utf-8")

    def _steps_done(self, spec: RunSpec) -> int:
        path = self.run_dir(spec) / "metrics.jsonl"
        try:
            with path.open("rb") as f:
                return max(sum(1 for _ in f) - 1, 0)  # the step-0 evaluation line is not a step
        except OSError:
            return 0
