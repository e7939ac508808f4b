"""The sanity task (step-by-step addition): worked solutions, disjoint splits, curation by pass@k > 0."""

from __future__ import annotations

import json
import re

import pytest

from nemo_dppo.config import ConfigError, load_config
from nemo_dppo.tasks import make_task
from nemo_dppo.tasks.sanity import CURATED_FILE, StepwiseAdditionTask, worked_solution

STEP = re.compile(r"^(\d)\+(\d)\+(\d)=(\d\d)$")


def _check_worked(a: int, b: int, digits: int, text: str) -> None:
    """An independent reading of the format: digit steps least significant first, carries chained, then a + b."""
    *steps, result = text.split(",")
    assert int(result) == a + b
    carry = 0
    xs, ys = f"{a:0{digits}d}"[::-1], f"{b:0{digits}d}"[::-1]
    for step, x, y in zip(steps, xs, ys, strict=True):
        m = STEP.match(step)
        assert m is not None, step
        assert (m[1], m[2], int(m[3])) == (x, y, carry)
        assert int(m[4]) == int(x) + int(y) + carry
        carry = int(m[4]) // 10


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_worked_solutions_are_correct(digits):
    import random

    rng = random.Random(digits)
    for _ in range(300):
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        _check_worked(a, b, digits, worked_solution(a, b, digits))
    assert worked_solution(47, 85, 2) == "7+5+0=12,4+8+1=13,132"


def test_splits_are_disjoint_and_training_needs_curation():
    task = StepwiseAdditionTask(2, seed=0, num_candidates=1024)
    eval_prompts = {p.prompt for p in task.all_problems("eval")}
    assert len(eval_prompts) == 512
    assert not eval_prompts & {p.prompt for p in task._candidates}
    assert not eval_prompts & {p.prompt for p in task.warm_start_problems()}
    with pytest.raises(RuntimeError, match="curated first"):
        task.all_problems("train")


def test_curation_keeps_only_solved_problems_and_fails_in_one_line():
    task = StepwiseAdditionTask(1, seed=0, num_candidates=40)
    counts = [i % 3 for i in range(40)]  # 0 on every third candidate
    report = task.curate(lambda problems: counts[: len(problems)], num_train=20, k=4)
    assert [r["correct_of_k"] for r in report["train"]] == [c for c in counts if c > 0][:20]
    assert len(task.all_problems("train")) == 20 and report["solvable_fraction"] == pytest.approx(26 / 40)
    with pytest.raises(RuntimeError, match=r"only 26 of 40 candidates have pass@4 > 0 \(need 30\)"):
        StepwiseAdditionTask(1, seed=0, num_candidates=40).curate(lambda p: counts[: len(p)], num_train=30, k=4)


def test_bad_curated_file_is_one_line(tmp_path):
    (tmp_path / CURATED_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a curated sanity training set"):
        StepwiseAdditionTask(1, num_candidates=40).load_curated(tmp_path / CURATED_FILE)


def test_config_checks_the_candidate_pool():
    with pytest.raises(ConfigError, match=r"task\.curation_candidates=500 exceeds the 80 problems"):
        load_config(None, ["task.name=sanity", "task.num_digits=1", "task.curation_candidates=500",
                           "task.num_train=8"])  # fmt: skip


@pytest.mark.slow
def test_warm_start_curates_problems_the_initial_policy_solves(tmp_path):
    """The curated set is what the saved initial policy solves: recounting with that policy reproduces every
    recorded count, and each is > 0 (pass@k > 0 at curation)."""
    from nemo_dppo.models.tiny_moe import load_model_dir
    from nemo_dppo.warm_start import _solve_counts, warm_started_model_dir

    cfg = load_config(None, ["task.name=sanity", "task.num_digits=1", "task.num_train=6", "task.curation_k=8",
                             "task.curation_candidates=40", "warm_start.steps=150", "model.hidden_size=64",
                             f"warm_start.cache_dir={tmp_path}"])  # fmt: skip
    model_dir = warm_started_model_dir(cfg.model, cfg.task, cfg.warm_start)
    report = json.loads((model_dir / CURATED_FILE).read_text())
    assert len(report["train"]) == 6 and all(r["correct_of_k"] > 0 for r in report["train"])
    task = make_task(cfg.task, curated_dir=model_dir)
    assert [p.prompt for p in task.all_problems("train")] == [r["prompt"] for r in report["train"]]
    model, tokenizer = load_model_dir(str(model_dir))
    recount = _solve_counts(model, tokenizer, task, task._candidates, 8)
    by_prompt = {p.prompt: c for p, c in zip(task._candidates, recount, strict=True)}
    assert [by_prompt[r["prompt"]] for r in report["train"]] == [r["correct_of_k"] for r in report["train"]]
