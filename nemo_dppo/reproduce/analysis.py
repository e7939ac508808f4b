"""From a sweep's metrics to the numbers the report states, and the verdicts computed from them.

Per run (rules stated here and in the report):
- final training accuracy: mean rollout accuracy of the last `FINAL_WINDOW` steps (0 for a diverged run's
  missing steps: a run stopped by a non-finite loss counts as collapsed at that step);
- peak mismatch: the largest per-step k3 estimate of KL(μ ‖ π) on the rollout's own weights;
- collapse step: the first step at which the `SMOOTH`-step moving average of training accuracy is below half of
  its running peak, once that peak reached `MIN_PEAK` (None: never; a diverged run collapses where it stopped).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from nemo_dppo.run_logger import read_metrics

FINAL_WINDOW = 10
SMOOTH = 10
MIN_PEAK = 0.2


@dataclass
class RunSummary:
    method: str
    lr: float
    seed: int
    status: str
    steps: int
    final_accuracy: float
    peak_mismatch: float
    collapse_step: int | None
    series: dict[str, list[float]]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def collapse_step(steps: list[int], accuracy: list[float]) -> int | None:
    peak = -math.inf
    for step, value in zip(steps, moving_average(accuracy, SMOOTH), strict=True):
        peak = max(peak, value)
        if peak >= MIN_PEAK and value < 0.5 * peak:
            return step
    return None


SERIES = {
    "accuracy": "reward/accuracy",
    "mismatch": "mismatch/kl_k3",
    "bad_updates": "loss/bad_update_frac",
    "dropped_mu": "dropped/mu_mean",
    "dropped_entropy": "dropped/entropy_mean",
    "entropy": "entropy/mean",
    "mu": "response/mu_mean",
    "dropped_frac": "dropped/frac",
    "eval": "eval/accuracy",
}


def summarize_run(run_dir: Path, method: str, lr: float, seed: int, status: str, total_steps: int) -> RunSummary:
    records = [r for r in read_metrics(run_dir) if r.get("step", 0) > 0 and "reward/accuracy" in r]
    steps = [int(r["step"]) for r in records]
    series = {name: [_num(r.get(key)) for r in records] for name, key in SERIES.items()}
    series["step"] = [float(s) for s in steps]
    accuracy = list(series["accuracy"])
    if status == "diverged":  # the missing steps of a stopped run scored nothing
        accuracy += [0.0] * max(total_steps - len(accuracy), 0)
    final = statistics.fmean(accuracy[-FINAL_WINDOW:]) if accuracy else 0.0
    mismatch = [m for m in series["mismatch"] if not math.isnan(m)]
    collapse = collapse_step(steps, series["accuracy"]) if steps else None
    if status == "diverged" and collapse is None:
        collapse = (steps[-1] if steps else 0) + 1
    return RunSummary(method, lr, seed, status, len(steps), final, max(mismatch, default=math.nan), collapse, series)


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) and value is not None else math.nan


@dataclass
class GroupSummary:
    """One method at one learning rate, over seeds."""

    method: str
    lr: float
    runs: list[RunSummary]

    @property
    def final(self) -> list[float]:
        return [r.final_accuracy for r in self.runs]

    @property
    def final_mean(self) -> float:
        return statistics.fmean(self.final)

    @property
    def final_sd(self) -> float:
        return statistics.stdev(self.final) if len(self.final) > 1 else 0.0

    @property
    def peak_mismatch(self) -> float:
        return max((r.peak_mismatch for r in self.runs if not math.isnan(r.peak_mismatch)), default=math.nan)

    @property
    def collapsed(self) -> int:
        return sum(r.collapse_step is not None for r in self.runs)

    @property
    def first_collapse(self) -> int | None:
        return min((r.collapse_step for r in self.runs if r.collapse_step is not None), default=None)

    def mean_series(self, name: str, start: int = 0) -> float:
        """Mean over seeds and steps ≥ `start` of a series (NaN-skipping)."""
        values = [v for r in self.runs for s, v in zip(r.series["step"], r.series[name], strict=True)
                  if s >= start and not math.isnan(v)]  # fmt: skip
        return statistics.fmean(values) if values else math.nan

    def mean_accuracy_until(self, step: int) -> float:
        """Area under the training-accuracy curve up to `step`, per step (the speed of learning)."""
        values = [v for r in self.runs for s, v in zip(r.series["step"], r.series["accuracy"], strict=True)
                  if s <= step]  # fmt: skip
        return statistics.fmean(values) if values else math.nan


@dataclass(frozen=True)
class Verdict:
    takeaway: str
    verdict: str  # reproduced | not reproduced | inconclusive
    rule: str
    evidence: str


MARGIN = 0.02


def exceeds(a: list[float], b: list[float]) -> bool:
    """a > b beyond noise: mean(a) − mean(b) exceeds both their pooled sd over seeds and MARGIN."""
    sd = [statistics.stdev(x) if len(x) > 1 else 0.0 for x in (a, b)]
    return statistics.fmean(a) - statistics.fmean(b) > max(math.sqrt((sd[0] ** 2 + sd[1] ** 2) / 2), MARGIN)


def better(a: GroupSummary, b: GroupSummary) -> bool:
    """a ends with a higher training accuracy than b beyond noise (`exceeds` on the final accuracies)."""
    return exceeds(a.final, b.final)


def steadier(a: GroupSummary, b: GroupSummary) -> bool:
    """a is the more stable: better final accuracy, or fewer collapsed seeds."""
    return better(a, b) or a.collapsed < b.collapsed
