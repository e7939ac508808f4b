"""The task protocol: what the RL loop, the warm start and the evaluation need of a verifiable task.

A task is a fixed train split and a held-out eval split of `Problem`s, and a rule-based reward. Tasks that can
warm-start the tiny local policy (no pretrained model can be downloaded here) also give the supervised response
of a problem. A new task is one file implementing `Task`, registered in `nemo_dppo.tasks.TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

SPLITS = ("train", "eval")
#: `task.name` values (`nemo_dppo.tasks.make_task`).
TASK_NAMES = ("arithmetic", "sanity", "math")


@dataclass(frozen=True)
class Problem:
    """One prompt ("12+34=") and the answer its reward checks ("46")."""

    prompt: str
    answer: str


@runtime_checkable
class Task(Protocol):
    """A verifiable task: fixed splits and a ±1 reward."""

    def all_problems(self, split: str) -> list[Problem]:
        """Every problem of `split` ("train" or "eval") in a fixed order."""
        ...

    def reward(self, response_text: str, answer: str, correct: float = 1.0, wrong: float = -1.0) -> float:
        """`correct` when the decoded response (special tokens removed) solves the problem, else `wrong`."""
        ...


@runtime_checkable
class WarmStartTask(Task, Protocol):
    """A task the tiny policy can be supervised on before RL (`nemo_dppo.warm_start`)."""

    def sft_response(self, problem: Problem) -> str:
        """The response text a supervised example teaches for `problem` (the caller appends EOS)."""
        ...


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
