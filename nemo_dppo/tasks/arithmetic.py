"""A synthetic, verifiable arithmetic task: prompts like "12+34=", answers like "46".

Every (a, op, b) problem with `num_digits`-digit operands (leading zeros allowed: "07+30=") is assigned to the
train or eval split by a seeded shuffle, so the two splits are disjoint and deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from nemo_dppo.tasks.base import Problem

_OPS: dict[str, object] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


def sft_example(prompt: str, answer: str) -> str:
    """The full text of a supervised warm-start example; the caller appends the EOS token id."""
    return f"{prompt}{answer}"


def reward(response_text: str, answer: str, correct: float = 1.0, wrong: float = -1.0) -> float:
    """`correct` when the response (decoded up to EOS, no special tokens) equals `answer` after stripping."""
    try:
        return correct if str(response_text).strip() == str(answer).strip() else wrong
    except Exception:  # never raise on malformed input (e.g. undecodable objects)
        return wrong


class ArithmeticTask:
    """Problems `a op b` with `num_digits`-digit operands, split into disjoint train / eval sets."""

    def __init__(
        self,
        num_digits: int = 2,
        ops: Sequence[str] = ("+",),
        seed: int = 0,
        eval_fraction: float = 0.1,
    ) -> None:
        if num_digits < 1:
            raise ValueError(f"num_digits must be >= 1, got {num_digits}")
        unknown = [op for op in ops if op not in _OPS]
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty subset of {sorted(_OPS)}, got {list(ops)}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        self.num_digits = num_digits
        self.ops = tuple(ops)
        self.seed = seed
        size = 10**num_digits
        self._count = len(self.ops) * size * size
        # A seeded permutation of problem indices: the first `num_eval` are the eval split.
        order = list(range(self._count))
        random.Random(seed).shuffle(order)
        num_eval = max(1, round(self._count * eval_fraction))
        self._splits = {"eval": order[:num_eval], "train": order[num_eval:]}
        self._rngs = {split: random.Random(f"{seed}:{split}") for split in self._splits}

    def _problem(self, index: int) -> Problem:
        size = 10**self.num_digits
        op_index, rest = divmod(index, size * size)
        a, b = divmod(rest, size)
        op = self.ops[op_index]
        value = _OPS[op](a, b)  # type: ignore[operator]
        width = self.num_digits
        return Problem(prompt=f"{a:0{width}d}{op}{b:0{width}d}=", answer=str(value))

    def split_size(self, split: str) -> int:
        """Number of distinct problems in `split` ("train" or "eval")."""
        return len(self._indices(split))

    def _indices(self, split: str) -> list[int]:
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self._splits[split]

    def sample(self, n: int, split: str = "train") -> list[Problem]:
        """`n` problems from `split`, drawn with replacement from a seeded per-split stream."""
        indices = self._indices(split)
        rng = self._rngs[split]
        return [self._problem(rng.choice(indices)) for _ in range(n)]

    def all_problems(self, split: str) -> list[Problem]:
        """Every problem of `split`, in the split's fixed order (for exhaustive evaluation)."""
        return [self._problem(i) for i in self._indices(split)]

    def warm_start_problems(self) -> list[Problem]:
        """The supervised warm start draws from the train split."""
        return self.all_problems("train")

    def reward(self, response_text: str, answer: str, correct: float = 1.0, wrong: float = -1.0) -> float:
        return reward(response_text, answer, correct, wrong)

    def sft_response(self, problem: Problem) -> str:
        return problem.answer
