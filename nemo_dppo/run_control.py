"""What wraps the RL loop without being part of it: stop signals, the progress bar, phase timers.

Invariant: SIGTERM / SIGUSR1 never interrupt a step; they only ask the loop to stop after it (and checkpoint).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the block's wall time to `timings[name]` (seconds)."""
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def stop_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """SIGTERM / SIGUSR1 (Slurm preemption) call `request_stop(name)`: finish the step, checkpoint, exit 0."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        request_stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def progress_bar(enabled: bool, console: Console) -> Iterator[Progress]:
    """One bar for a run: step n/N, the last rollout reward, elapsed time."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]:+.3f}"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )
    with progress:
        yield progress


class NoLogger(contextlib.AbstractContextManager):
    """Stands for `RunLogger` on the ranks that do not log."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        return None


def average_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Mean over mini-batches; min of `*_min`, max of `*_max`."""
    out: dict[str, float] = {}
    for key in parts[0]:
        values = [p[key] for p in parts if key in p]
        if key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out
