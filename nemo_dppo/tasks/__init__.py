"""Verifiable tasks behind one protocol (`tasks.base.Task`), made from `task.name` by `make_task`.

`arithmetic` (answer only), `sanity` (step-by-step addition on a curated training set, the paper's Section 5
setting for the tiny MoE) and `math` (prepared DAPO-Math / AIME files, math-verify reward; needs `model.path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_dppo.tasks.base import TASK_NAMES, Problem, Task, WarmStartTask


def make_task(cfg: Any, curated_dir: Path | None = None) -> Task:
    """The task of `cfg.name` (a `config.TaskConfig`); the sanity task reads its curated training set from
    `curated_dir`."""
    if cfg.name == "math":
        from nemo_dppo.data import MathTask

        assert cfg.train_path is not None  # checked by TaskConfig
        return MathTask(
            cfg.train_path, eval_path=cfg.eval_path, seed=cfg.seed, reward_timeout_s=cfg.reward_timeout_s
        )
    if cfg.name == "sanity":
        from nemo_dppo.tasks.sanity import CURATED_FILE, StepwiseAdditionTask

        task = StepwiseAdditionTask(cfg.num_digits, seed=cfg.seed, num_candidates=cfg.curation_candidates)
        if curated_dir is not None:
            task.load_curated(curated_dir / CURATED_FILE)
        return task
    if cfg.name == "arithmetic":
        from nemo_dppo.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask(num_digits=cfg.num_digits, ops=cfg.ops, seed=cfg.seed)
    raise ValueError(f"unknown task.name {cfg.name!r}; valid tasks: {', '.join(TASK_NAMES)}")


__all__ = ["TASK_NAMES", "Problem", "Task", "WarmStartTask", "make_task"]
