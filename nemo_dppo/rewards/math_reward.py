"""Math reward: +1 when the response's last `\\boxed{...}` equals the reference answer under math-verify, else −1.

    reward = MathReward()                  # +1 / −1, 5 s per item, boxed answer required
    reward("... so the answer is \\boxed{\\frac{1}{2}}.", "0.5")   # → 1.0

The prediction is the content of the *last* `\\boxed{...}` (or `\\fbox{...}`) of the response, braces balanced, so
`\\boxed{\\frac{1}{2}}` yields `\\frac{1}{2}`; a response with no box, or whose last box is never closed (cut by
`max_new_tokens`), is wrong. Integers are compared directly; everything else is parsed and compared by
math-verify (LaTeX → SymPy, numeric tolerance, sets, intervals), the reference being parsed as `\\boxed{answer}`.

Robustness: a call never raises on model output (None, bytes, unbalanced LaTeX, absurd expressions all score
`wrong`), and each item has a deadline. math-verify's own timeouts use `signal.alarm`, which works only in the main
thread, so they are switched off and replaced by a guard of our own:

- main thread (the trainer, the eval command): a `SIGALRM` interval timer around the whole parse + verify; it
  repeats every 0.1 s after the deadline, so a `try/except` deep in SymPy cannot swallow it. No processes, no IPC.
- any other thread (or a main thread whose real-time timer is already in use): the item runs in a small pool of
  worker processes (spawned once, reused); a worker that misses the deadline is killed and replaced.

A timed-out item scores `wrong` and is counted in `MathReward.timeouts`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, Literal, TypeVar

from nemo_dppo.errors import UserError

logger = logging.getLogger(__name__)

#: "auto": SIGALRM timer in the main thread, worker processes elsewhere. "signal" / "process" force one
#: (a forced "signal" outside the main thread still falls back to processes: signals cannot work there).
GuardMode = Literal["auto", "signal", "process"]

DEFAULT_TIMEOUT_S = 5.0
#: After the deadline the timer keeps firing at this interval until the guarded call has unwound.
_REFIRE_S = 0.1
#: Spawning a worker imports SymPy + math-verify (~1-3 s); that start-up is not charged to the item's deadline.
_WORKER_STARTUP_TIMEOUT_S = 120.0
_BOXED_COMMANDS = ("\\boxed", "\\fbox")
#: A boxed answer longer than this is not an answer (cheap protection against pathological parses).
DEFAULT_MAX_ANSWER_CHARS = 1000
_INTEGER = re.compile(r"[+-]?\d+")
_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------- extraction
def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` of `text` (nested braces balanced), stripped.

    `\\boxed 5` (no braces) gives "5". None when there is no box or the last one is never closed.
    """
    start, command = -1, ""
    for candidate in _BOXED_COMMANDS:
        index = text.rfind(candidate)
        if index > start:
            start, command = index, candidate
    if start < 0:
        return None
    open_at = start + len(command)
    if text.startswith("{", open_at):
        depth = 0
        for pos in range(open_at, len(text)):
            char = text[pos]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[open_at + 1 : pos].strip()
        return None
    bare = re.match(r" +([^\s$]+)", text[open_at:])
    return bare.group(1) if bare else None


def _plain(text: str) -> str:
    """Whitespace, `$`, thin spaces and a trailing full stop removed (string comparison fallback)."""
    text = re.sub(r"\\[,;:! ]|\s+|\$", "", text)
    return text.rstrip(".")


def _fast_compare(prediction: str, reference: str) -> bool | None:
    """Decide cheaply when possible: identical plain strings, or two integers. None: ask math-verify."""
    pred, ref = _plain(prediction), _plain(reference)
    if pred == ref and pred:
        return True
    if _INTEGER.fullmatch(pred) and _INTEGER.fullmatch(ref):
        return int(pred) == int(ref)
    return None


# ----------------------------------------------------------------------------------------- math-verify
@lru_cache(maxsize=1)
def _math_verify() -> ModuleType:
    """Import math-verify once, with its signal-based timeouts' one-time warnings silenced (we guard instead)."""
    try:
        import math_verify
        import math_verify.grader
        import math_verify.parser
    except ImportError:
        raise UserError("the math reward needs math-verify: pip install -c constraints-cpu.txt -e '.[math]'") from None
    for module in (math_verify.parser, math_verify.grader):
        if hasattr(module, "TIMEOUT_WARNING_SHOWN"):
            module.TIMEOUT_WARNING_SHOWN = True
    return math_verify


@lru_cache(maxsize=1)
def _extraction_configs() -> tuple[list[Any], list[Any]]:
    mv = _math_verify()
    prediction = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    reference = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    return prediction, reference


@lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> tuple[Any, ...]:
    mv = _math_verify()
    text = reference if "\\boxed" in reference else f"\\boxed{{{reference}}}"
    return tuple(mv.parse(text, extraction_config=_extraction_configs()[1], parsing_timeout=None))


def warm_up() -> None:
    """Import math-verify and build its parsers now, so that the first scored item pays no start-up cost."""
    _extraction_configs()
    _parse_reference("1")


def check_answer(
    response: str, reference: str, require_boxed: bool = True, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
) -> bool:
    """The unguarded decision (no deadline): does `response` answer `reference`? May be slow on absurd input."""
    mv = _math_verify()
    boxed = extract_boxed(response)
    if boxed is None:
        if require_boxed:
            return False
        prediction = mv.parse(response[-max_answer_chars * 4 :], parsing_timeout=None)
    else:
        if len(boxed) > max_answer_chars:
            return False
        decided = _fast_compare(boxed, reference)
        if decided is not None:
            return decided
        prediction = mv.parse(f"\\boxed{{{boxed}}}", extraction_config=_extraction_configs()[0], parsing_timeout=None)
    if not prediction:
        return False
    gold = _parse_reference(reference)
    if not gold:  # a reference math-verify cannot read: plain string equality is all we can do
        return boxed is not None and _plain(boxed) == _plain(reference)
    return bool(mv.verify(list(gold), prediction, timeout_seconds=None))


# ------------------------------------------------------------------------------------------ main thread
class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so that math-verify's `except Exception` lets it through."""


def _signal_guard_usable() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0
    )


def _run_with_alarm(fn: Callable[[], _T], timeout_s: float) -> tuple[bool, _T | None]:
    """(True, fn()) when `fn` finishes within `timeout_s`, else (False, None). Main thread only."""
    armed = [True]

    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        if armed[0]:
            raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    done, value = False, None
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s, _REFIRE_S)
            value = fn()
            done = True
        finally:
            _disarm(armed, previous)
    except _Deadline:  # the deadline, or a late tick between `fn` returning and the disarm
        pass
    return done, value


def _disarm(armed: list[bool], previous: Any) -> None:
    """Stop the timer and restore the previous handler, even when a tick interrupts us half-way."""
    while True:
        try:
            armed[0] = False  # from here on the handler is a no-op
            signal.setitimer(signal.ITIMER_REAL, 0.0)
            signal.signal(signal.SIGALRM, previous)
            return
        except _Deadline:
            continue


# ------------------------------------------------------------------------------------------ other threads
class _Worker:
    """One `python -m nemo_dppo.rewards._worker` process, spoken to in JSON lines over its stdin / stdout.

    A plain subprocess rather than `multiprocessing`: spawning never re-imports the caller's `__main__` and never
    forks a process that holds torch thread pools.
    """

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nemo_dppo.rewards._worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        self._buffer = b""
        if self._read_line(_WORKER_STARTUP_TIMEOUT_S) != b"ready":
            self.stop()
            raise RuntimeError("math reward worker did not start")

    def ask(self, request: list[Any], timeout_s: float) -> bool | None:
        """The worker's decision, or None when it is late or gone (the caller then stops it)."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return None
        line = self._read_line(timeout_s)
        return None if line is None else line == b"1"

    def _read_line(self, timeout_s: float) -> bytes | None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # the worker died
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


class _ProcessGuard:
    """At most `max_workers` worker processes, started on demand and reused; a late worker is killed."""

    def __init__(self, max_workers: int) -> None:
        self._slots = threading.BoundedSemaphore(max_workers)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def run(self, request: list[Any], timeout_s: float) -> bool | None:
        """The decision, or None when the deadline passed (or no worker could be had)."""
        with self._slots:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                try:
                    worker = _Worker()
                except Exception as err:
                    logger.warning("math reward: cannot start a worker process (%s); scoring as wrong", err)
                    return None
            result = worker.ask(request, timeout_s)
            if result is None:
                worker.stop()
            else:
                with self._lock:
                    self._idle.append(worker)
            return result

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()


_GUARDS: weakref.WeakSet[_ProcessGuard] = weakref.WeakSet()


@atexit.register
def _close_all_guards() -> None:
    for guard in list(_GUARDS):
        guard.close()


# -------------------------------------------------------------------------------------------- the reward
def _as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    try:
        return str(value)
    except Exception:
        return None


class MathReward:
    """`reward(response, answer)` → `correct` if the last boxed answer matches, else `wrong`; never raises.

    Args:
        correct / wrong: the two reward values (+1 / −1, as the paper's binary reward).
        timeout_s: deadline per item for parsing + verification (None or ≤ 0: no deadline).
        require_boxed: when False, a response without a box is read by math-verify (the last expression of its
            final `4 * max_answer_chars` characters).
        max_answer_chars: a longer boxed answer is wrong without being parsed.
        guard: "auto" (see the module docstring), "signal" or "process".
        max_workers: worker processes for the off-main-thread path (default min(4, CPUs)).
    """

    def __init__(
        self,
        correct: float = 1.0,
        wrong: float = -1.0,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        require_boxed: bool = True,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        guard: GuardMode = "auto",
        max_workers: int | None = None,
    ) -> None:
        if guard not in ("auto", "signal", "process"):
            raise ValueError(f"guard must be 'auto', 'signal' or 'process', got {guard!r}")
        warm_up()  # fail early (one line) when math-verify is missing; no first-item start-up cost
        self.correct = float(correct)
        self.wrong = float(wrong)
        self.timeout_s = timeout_s if timeout_s is not None and timeout_s > 0 else None
        self.require_boxed = require_boxed
        self.max_answer_chars = max_answer_chars
        self.guard = guard
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self.timeouts = 0
        self._processes: _ProcessGuard | None = None
        self._lock = threading.Lock()

    def __call__(self, response: object, answer: object) -> float:
        return self.correct if self.is_correct(response, answer) else self.wrong

    def is_correct(self, response: object, answer: object) -> bool:
        """True when `response` answers `answer`; False on a wrong, malformed or timed-out response."""
        try:
            text, reference = _as_text(response), _as_text(answer)
            if text is None or reference is None or not reference.strip():
                return False
            reference = reference.strip()
            if self.require_boxed and not any(command in text for command in _BOXED_COMMANDS):
                return False
            outcome = self._decide(text, reference)
            if outcome is None:
                with self._lock:
                    self.timeouts += 1
                return False
            return outcome
        except Exception:  # never let model output crash a training step
            logger.debug("math reward: error while scoring", exc_info=True)
            return False

    def _decide(self, text: str, reference: str) -> bool | None:
        request = [text, reference, self.require_boxed, self.max_answer_chars]
        if self.timeout_s is None:
            return check_answer(*request)
        if self.guard != "process" and _signal_guard_usable():
            done, value = _run_with_alarm(lambda: check_answer(*request), self.timeout_s)
            return bool(value) if done else None
        return self._process_guard().run(request, self.timeout_s)

    def _process_guard(self) -> _ProcessGuard:
        with self._lock:
            if self._processes is None:
                self._processes = _ProcessGuard(self.max_workers)
                _GUARDS.add(self._processes)
            return self._processes

    def close(self) -> None:
        """Stop the worker processes (if any were started); the reward stays usable."""
        with self._lock:
            guard, self._processes = self._processes, None
        if guard is not None:
            guard.close()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (e.g. shipped to Ray / multiprocessing workers): settings only, no lock or processes."""
        state = dict(self.__dict__)
        state["_processes"] = None
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DEFAULT_REWARD: MathReward | None = None
_DEFAULT_LOCK = threading.Lock()


def math_verify_reward(response_text: object, answer: object, correct: float = 1.0, wrong: float = -1.0) -> float:
    """Drop-in for `nemo_dppo.tasks.arithmetic.reward`: `correct` / `wrong` with a shared default `MathReward`."""
    global _DEFAULT_REWARD
    with _DEFAULT_LOCK:
        if _DEFAULT_REWARD is None:
            _DEFAULT_REWARD = MathReward()
        reward = _DEFAULT_REWARD
    return correct if reward.is_correct(response_text, answer) else wrong
