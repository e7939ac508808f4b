"""The sanity task (the paper's Section 5 setting, made for the tiny MoE): step-by-step addition.

"47+85=" is answered with its worked digits, least significant first, each step `x+y+carry=sum` on two digits,
then the result: "7+5+0=12,4+8+1=13,132" (22 tokens with EOS for 2-digit operands). The reward is +1 only for
exactly this worked solution, so every one of its ~20 tokens must be right: long enough for the trust region to act
on many tokens of a response.

As in the paper, the training set is fixed and curated: a problem is kept only if the initial policy solved it in
at least one of `curation_k` samples (`curate`), so a stable method can drive training accuracy toward 100 %. The
eval split is disjoint from every curation candidate.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from nemo_dppo.tasks.arithmetic import reward as exact_match_reward
from nemo_dppo.tasks.base import Problem, check_split

CURATED_FILE = "curated_train.json"
#: Size of the held-out eval split (runs evaluate its first `task.num_eval_prompts`): fixed, so that evaluating
#: fewer prompts does not change the curation candidates or the warm start.
EVAL_SPLIT_SIZE = 512


def worked_solution(a: int, b: int, num_digits: int) -> str:
    """'7+5+0=12,4+8+1=13,132' for 47 + 85: one `x+y+carry=sum` step per digit, then the sum."""
    xs, ys = f"{a:0{num_digits}d}"[::-1], f"{b:0{num_digits}d}"[::-1]
    carry, steps = 0, []
    for x, y in zip(xs, ys, strict=True):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return ",".join([*steps, str(a + b)])


class StepwiseAdditionTask:
    """Step-by-step `num_digits`-digit addition; train = the curated problems once `curate` has run."""

    def __init__(
        self, num_digits: int = 2, seed: int = 0, num_eval: int = EVAL_SPLIT_SIZE, num_candidates: int = 1024
    ) -> None:
        if num_digits < 1:
            raise ValueError(f"num_digits must be >= 1, got {num_digits}")
        size = 10**num_digits
        pairs = [(a, b) for a in range(size) for b in range(size)]
        random.Random(f"sanity:{seed}").shuffle(pairs)
        num_eval = min(num_eval, len(pairs) // 5)  # 1-digit operands: 100 problems, 20 held out
        if num_eval + num_candidates > len(pairs):
            raise ValueError(
                f"task.curation_candidates={num_candidates} exceeds the {len(pairs) - num_eval} problems outside "
                f"the eval split of {num_digits}-digit addition"
            )
        self.num_digits = num_digits
        self._eval = [self._problem(a, b) for a, b in pairs[:num_eval]]
        self._candidates = [self._problem(a, b) for a, b in pairs[num_eval : num_eval + num_candidates]]
        self._warm = [self._problem(a, b) for a, b in pairs[num_eval:]]  # never the eval problems
        self._train: list[Problem] | None = None

    def _problem(self, a: int, b: int) -> Problem:
        width = self.num_digits
        return Problem(prompt=f"{a:0{width}d}+{b:0{width}d}=", answer=worked_solution(a, b, width))

    def all_problems(self, split: str) -> list[Problem]:
        check_split(split)
        if split == "eval":
            return list(self._eval)
        if self._train is None:
            raise RuntimeError("the sanity task's training set is curated first: call curate() or load_curated()")
        return list(self._train)

    def warm_start_problems(self) -> list[Problem]:
        """Supervised warm-start pool: every problem outside the eval split."""
        return list(self._warm)

    def reward(self, response_text: str, answer: str, correct: float = 1.0, wrong: float = -1.0) -> float:
        return exact_match_reward(response_text, answer, correct, wrong)

    def sft_response(self, problem: Problem) -> str:
        return problem.answer

    def curate(self, solve_counts: Callable[[Sequence[Problem]], list[int]], num_train: int, k: int) -> dict:
        """Keep the first `num_train` candidates with pass@k > 0; `solve_counts` gives correct samples of k each."""
        counts = solve_counts(self._candidates)
        kept = [(p, c) for p, c in zip(self._candidates, counts, strict=True) if c > 0][:num_train]
        if len(kept) < num_train:
            raise RuntimeError(
                f"sanity curation: only {len(kept)} of {len(self._candidates)} candidates have pass@{k} > 0 "
                f"(need {num_train}); warm-start longer or lower task.num_train"
            )
        self._train = [p for p, _ in kept]
        return {
            "k": k,
            "candidates": len(self._candidates),
            "solvable_fraction": sum(c > 0 for c in counts) / len(counts),
            "mean_pass_rate": sum(counts) / (k * len(counts)),
            "train": [{"prompt": p.prompt, "answer": p.answer, "correct_of_k": c} for p, c in kept],
        }

    def load_curated(self, path: Path) -> None:
        """Read the training set written at curation (`CURATED_FILE` beside the warm-started policy)."""
        try:
            records = json.loads(path.read_text(encoding="utf-8"))["train"]
            self._train = [Problem(prompt=str(r["prompt"]), answer=str(r["answer"])) for r in records]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a curated sanity training set ({err})") from None
