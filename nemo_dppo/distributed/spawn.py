"""Start the ranks of a multi-process job on this machine, torchrun-style, so the user types one command.

`spawn(["-m", "nemo_dppo.launch", "train", cfg.yaml], world_size=4)` runs `python -m nemo_dppo.launch train
cfg.yaml` four times with torchrun's environment (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`,
`MASTER_ADDR=127.0.0.1`, a free `MASTER_PORT`, `GLOO_SOCKET_IFNAME=lo`) and `OMP_NUM_THREADS` = the machine's
cores split between the ranks, so N ranks on few cores do not oversubscribe them.

- SIGTERM / SIGUSR1 / SIGINT sent to the launcher are forwarded to every rank (Slurm preemption reaches the
  training loop, which agrees on a step to stop at, checkpoints and exits 0).
- When a rank fails, the others are terminated (they would wait forever in a collective); the launcher returns
  the first failing rank's exit code. On Linux every rank also dies with the launcher (`PR_SET_PDEATHSIG`), so
  `kill -9` of the launcher leaves no orphans.

The per-rank entry point is `python -m nemo_dppo.launch train CONFIG.yaml` (`nemo_dppo/launch.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

#: Set in every rank's environment: the process is one rank of a launched job.
LAUNCHED_ENV = "NEMO_DPPO_LAUNCHED"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: Seconds the other ranks get to exit on their own after one failed (rank 0 prints the error), then SIGTERM.
FAILURE_GRACE = 5.0
#: Seconds a rank gets to exit after SIGTERM, before SIGKILL.
TERMINATE_GRACE = 10.0


def is_launched_rank() -> bool:
    """True inside a rank started by `spawn` (or by torchrun / srun, which set RANK and WORLD_SIZE)."""
    return os.environ.get(LAUNCHED_ENV) == "1" or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def rank_environment(rank: int, world_size: int, port: int, threads: int) -> dict[str, str]:
    """torchrun's variables for one rank on 127.0.0.1."""
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": str(threads),
        LAUNCHED_ENV: "1",
    }


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(python_args: Sequence[str], world_size: int, *, threads_per_rank: int | None = None) -> int:
    """Run `python ARGS...` (e.g. `-m module ...` or `script.py ...`) as `world_size` ranks; returns 0, or rank 0's
    exit code if it failed, else the first failing rank's."""
    from nemo_dppo.megatron.parallel import free_port

    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    command = [sys.executable, *python_args]
    procs = [
        subprocess.Popen(
            command,
            env=rank_environment(rank, world_size, port, threads),
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        for rank in range(world_size)
    ]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return _wait(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _terminate(procs)


def _wait(procs: list[subprocess.Popen]) -> int:
    failed_at: float | None = None
    while True:
        codes = [proc.poll() for proc in procs]
        if all(code is not None for code in codes):
            break
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE:
            _terminate(procs)
            codes = [proc.poll() for proc in procs]
            break
        time.sleep(0.05)
    failed = [code for code in codes if code not in (None, 0)]
    if not failed:
        return 0
    return int(codes[0]) if codes[0] not in (None, 0) else int(failed[0])


def _terminate(procs: list[subprocess.Popen]) -> None:
    alive = [proc for proc in procs if proc.poll() is None]
    for proc in alive:
        proc.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE
    for proc in alive:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
