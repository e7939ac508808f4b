"""`MathTask`: prompts and answers from prepared files, with the math-verify reward — ArithmeticTask's interface.

    task = MathTask("data/dapo_math_17k.jsonl", eval_path="data/aime_2024.jsonl")
    problems = task.all_problems("train")          # objects with .prompt and .answer
    task.reward(response_text, problems[0].answer)  # +1 / −1

Without `eval_path`, a seeded `eval_fraction` of the training file is held out as the eval split (disjoint).
"""

from __future__ import annotations

import random
from pathlib import Path

from nemo_dppo.data.prepare import load_problems
from nemo_dppo.data.records import DataError, MathRecord
from nemo_dppo.rewards.math_reward import DEFAULT_TIMEOUT_S, MathReward

SPLITS = ("train", "eval")


class MathTask:
    """Math problems from prepared (or raw source) files, split into train / eval, with the boxed-answer reward."""

    def __init__(
        self,
        train_path: str | Path,
        eval_path: str | Path | None = None,
        seed: int = 0,
        eval_fraction: float = 0.01,
        reward_timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ) -> None:
        train = load_problems(train_path)
        if eval_path is not None:
            eval_problems = load_problems(eval_path)
        else:
            if not 0.0 < eval_fraction < 1.0:
                raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
            if len(train) < 2:
                raise DataError(f"{train_path}: {len(train)} problem(s); need >= 2 to hold out an eval split")
            order = list(range(len(train)))
            random.Random(seed).shuffle(order)
            num_eval = min(len(train) - 1, max(1, round(len(train) * eval_fraction)))
            held_out = set(order[:num_eval])
            eval_problems = [train[i] for i in sorted(held_out)]
            train = [p for i, p in enumerate(train) if i not in held_out]
        for name, problems, path in (("train", train, train_path), ("eval", eval_problems, eval_path or train_path)):
            if not problems:
                raise DataError(f"{path}: the {name} split has no problems")
        self.seed = seed
        self._splits: dict[str, list[MathRecord]] = {"train": train, "eval": eval_problems}
        self._rngs = {split: random.Random(f"{seed}:{split}") for split in SPLITS}
        self._reward = MathReward(timeout_s=reward_timeout_s)

    def _split(self, split: str) -> list[MathRecord]:
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self._splits[split]

    def split_size(self, split: str) -> int:
        """Number of problems in `split`."""
        return len(self._split(split))

    def all_problems(self, split: str) -> list[MathRecord]:
        """Every problem of `split` in file order (each has `.prompt` and `.answer`)."""
        return list(self._split(split))

    def sample(self, n: int, split: str = "train") -> list[MathRecord]:
        """`n` problems from `split`, drawn with replacement from a seeded per-split stream."""
        problems = self._split(split)
        rng = self._rngs[split]
        return [rng.choice(problems) for _ in range(n)]

    def reward(self, response_text: str, answer: str, correct: float = 1.0, wrong: float = -1.0) -> float:
        """`correct` when the response's last boxed answer equals `answer` (math-verify), else `wrong`."""
        return correct if self._reward.is_correct(response_text, answer) else wrong

    def close(self) -> None:
        """Stop the reward's worker processes, if any were started."""
        self._reward.close()
