"""Math reward: boxed extraction, math-verify equivalence, malformed output, and the per-item deadline on and off
the main thread."""

from __future__ import annotations

import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("math_verify")

import nemo_dppo.rewards.math_reward as mr
from nemo_dppo.rewards import MathReward, extract_boxed, math_verify_reward

#: An answer SymPy cannot compare quickly: 9^(9^(9^9)) has ~10^(3.7e8) digits.
SLOW = "\\boxed{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def reward() -> MathReward:
    with MathReward(timeout_s=5.0) as r:
        yield r


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} end", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{12}, final \\boxed{ 34 }", "34"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\fbox{7}", "7"),
        ("\\boxed 7 done", "7"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{12} then cut \\boxed{\\frac{1}{2", None),
        ("no box at all: 34", None),
        ("", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("response", "answer", "value"),
    [
        ("The sum is \\boxed{34}.", "34", 1.0),
        ("\\boxed{35}", "34", -1.0),
        ("\\boxed{033}", "33", 1.0),  # AIME answers written with leading zeros
        ("so $\\boxed{\\frac{1}{2}}$", "0.5", 1.0),  # nested braces, fraction vs decimal
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\frac{1}{3}}", "0.5", -1.0),
        ("\\boxed{\\dfrac{\\sqrt 3}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
        ("\\boxed{(1,2)}", "(1,2)", 1.0),
        ("\\boxed{12} ... no wait, \\boxed{34}", "34", 1.0),  # the last box is the answer
        ("\\boxed{34} ... no wait, \\boxed{12}", "34", -1.0),
        ("The answer is 34.", "34", -1.0),  # no box: wrong (the prompt asked for one)
    ],
)
def test_reward_values(reward: MathReward, response: str, answer: str, value: float) -> None:
    assert reward(response, answer) == value


@pytest.mark.parametrize(
    "response",
    [
        None,
        42,
        object(),
        b"\xff\xfe\\boxed{",
        "\\boxed{",
        "\\boxed{}",
        "\\boxed{\\frac{}{",
        "\\boxed{\\frac{1}{2",  # cut by max_new_tokens
        "\\boxed{}}}}{{{\\left(\\right.",
        "\\boxed{" + "(" * 5000 + "}",  # over max_answer_chars: rejected without parsing
        "x" * 200_000 + "\\boxed{7",
    ],
)
def test_malformed_output_scores_wrong_and_never_raises(reward: MathReward, response: object) -> None:
    assert reward(response, "7") == -1.0


def test_bytes_response_and_numeric_reference(reward: MathReward) -> None:
    assert reward(b"\\boxed{34}", 34) == 1.0
    assert reward("\\boxed{4}", 4.0) == 1.0  # a float answer from a parquet column
    assert reward("\\boxed{4}", "") == -1.0  # no reference: nothing can be right


def test_require_boxed_false_reads_the_whole_response() -> None:
    lenient = MathReward(require_boxed=False)
    assert lenient("The final answer is $34$.", "34") == 1.0
    assert lenient("The final answer is $35$.", "34") == -1.0


def test_custom_values_and_drop_in_function() -> None:
    assert MathReward(correct=2.0, wrong=0.0)("\\boxed{1}", "1") == 2.0
    assert MathReward(correct=2.0, wrong=0.0)("\\boxed{2}", "1") == 0.0
    # Same signature as nemo_dppo.tasks.arithmetic.reward(text, answer, correct, wrong).
    assert math_verify_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_verify_reward("\\boxed{3}", "0.5", correct=1.0, wrong=-0.5) == -0.5


def test_pickles_with_its_settings() -> None:
    restored = pickle.loads(pickle.dumps(MathReward(correct=3.0, timeout_s=2.0, require_boxed=False)))
    assert (restored.correct, restored.timeout_s, restored.require_boxed) == (3.0, 2.0, False)
    assert restored("$\\frac{1}{2}$", "0.5") == 3.0


def test_an_internal_error_scores_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object) -> bool:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(mr, "check_answer", boom)
    assert MathReward()("\\boxed{1}", "2") == -1.0


def test_timeout_in_main_thread_restores_signal_state() -> None:
    assert threading.current_thread() is threading.main_thread()
    calls: list[int] = []

    def previous_handler(signum: int, _frame: object) -> None:
        calls.append(signum)

    old = signal.signal(signal.SIGALRM, previous_handler)
    try:
        reward = MathReward(timeout_s=0.3)
        start = time.perf_counter()
        assert reward(SLOW, "10") == -1.0
        elapsed = time.perf_counter() - start
        assert 0.25 < elapsed < 5.0
        assert reward.timeouts == 1
        assert reward._processes is None  # the signal guard, no worker process
        assert signal.getsignal(signal.SIGALRM) is previous_handler
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0  # still works afterwards
        assert calls == []  # no stray tick reached the previous handler
    finally:
        signal.signal(signal.SIGALRM, old)


def test_other_threads_use_worker_processes_with_a_deadline() -> None:
    with MathReward(timeout_s=1.0, max_workers=1) as reward, ThreadPoolExecutor(max_workers=2) as pool:
        # Warm a worker first so its start-up (imports) is not mistaken for the deadline.
        assert pool.submit(reward, "\\boxed{\\frac{1}{2}}", "0.5").result() == 1.0
        assert reward._processes is not None
        start = time.perf_counter()
        assert pool.submit(reward, SLOW, "10").result() == -1.0
        assert time.perf_counter() - start < 10.0
        assert reward.timeouts == 1
        # The late worker was killed; a new one serves the next items.
        outcomes = list(pool.map(reward, ["\\boxed{34}", "\\boxed{0.5}", "garbage \\boxed{"], ["34", "1/2", "1"]))
        assert outcomes == [1.0, 1.0, -1.0]
