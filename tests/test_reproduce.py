"""`nemo-dppo reproduce`: the plan, the stated rules (collapse, verdicts) on synthetic curves, and --quick end to
end (runs finish, plots and report written, verdicts computed, a second call reuses every finished run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nemo_dppo.reproduce.analysis import GroupSummary, RunSummary, collapse_step, moving_average
from nemo_dppo.reproduce.experiments import EXPERIMENTS, LEARNING_RATES
from nemo_dppo.reproduce.runner import plan
from nemo_dppo.reproduce.verdicts import anchor_at_mu, topk_like_binary, trust_region_needed


def test_plan_shares_identical_runs_between_experiments():
    specs = plan(list(EXPERIMENTS.values()), seeds=3, learning_rates=None)
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys))
    stability = 7 * len(LEARNING_RATES) * 3
    # anchor adds its decoupled twin, bad_updates three masks, relax five variants, topk two modes (× 3 seeds)
    assert len(specs) == stability + 3 * (1 + 3 + 5 + 2)
    assert sum(k.startswith("dppo_binary_kl/") for k in keys) == len(LEARNING_RATES) * 3


def test_collapse_rule_matches_its_statement():
    accuracy = [0.6] * 30 + [0.05] * 30
    steps = list(range(1, 61))
    smoothed = moving_average(accuracy, 10)
    expected = next(s for s, v in zip(steps, smoothed, strict=True) if v < 0.5 * 0.6)
    assert collapse_step(steps, accuracy) == expected
    assert collapse_step(steps, [0.6] * 60) is None
    assert collapse_step(steps, [0.1] * 30 + [0.0] * 30) is None  # never reached the 0.2 peak


def _group(method: str, finals: list[float], collapsed: bool = False) -> GroupSummary:
    runs = [RunSummary(method, 3e-4, s, "finished", 100, f, 1e-3, 40 if collapsed else None,
                       {"step": [1.0], "accuracy": [f]}) for s, f in enumerate(finals)]  # fmt: skip
    return GroupSummary(method, 3e-4, runs)


def test_verdicts_follow_their_rules():
    lr = 3e-4
    stable = {("dppo_binary_tv", lr): _group("dppo_binary_tv", [0.9, 0.92, 0.91]),
              ("dppo_binary_kl", lr): _group("dppo_binary_kl", [0.9, 0.9, 0.93]),
              ("pg_is", lr): _group("pg_is", [0.2, 0.1, 0.3], collapsed=True),
              ("pg_tis", lr): _group("pg_tis", [0.4, 0.5, 0.3], collapsed=True)}  # fmt: skip
    assert trust_region_needed(stable).verdict == "reproduced"
    reversed_ = {k: _group(k[0], [1.0 - x for x in g.final], collapsed=not g.collapsed) for k, g in stable.items()}
    assert trust_region_needed(reversed_).verdict == "not reproduced"
    mixed = {**stable, ("pg_tis", lr): _group("pg_tis", [0.99, 0.99, 0.99])}
    assert trust_region_needed(mixed).verdict == "inconclusive"
    assert anchor_at_mu({}).verdict == "inconclusive"  # nothing ran: no verdict either way
    same = {("dppo_topk_tv", lr): _group("dppo_topk_tv", [0.9, 0.91, 0.9]),
            ("dppo_binary_tv", lr): _group("dppo_binary_tv", [0.91, 0.9, 0.9])}  # fmt: skip
    assert topk_like_binary(same).verdict == "reproduced"


@pytest.mark.slow
def test_quick_sweep_end_to_end(tmp_path):
    out = tmp_path / "quick"
    command = [sys.executable, "-m", "nemo_dppo.cli", "reproduce", "--quick", "--out", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    report = (out / "report.md").read_text(encoding="utf-8")
    for name in EXPERIMENTS:
        assert (out / f"{name}.png").stat().st_size > 10_000
        assert f"## {name} " in report
    verdict_rows = [line for line in report.splitlines() if line.startswith("| ") and "**" in line]
    assert len(verdict_rows) == 7
    assert all(any(v in row for v in ("reproduced", "inconclusive")) for row in verdict_rows)
    outcomes = sorted(Path(out, "runs").glob("*/*/outcome.json"))
    assert len(outcomes) == 18
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "18 runs (18 already finished)" in second.stderr.replace("\n", " ")
