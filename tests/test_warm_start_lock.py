"""Runs started side by side prepare one warm start (a file lock); a stopped preparation leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
from nemo_dppo.config import load_config
from nemo_dppo.warm_start import warm_started_model_dir
cfg = load_config(None, ["task.num_digits=1", "model.hidden_size=64", "warm_start.steps={steps}",
                         "warm_start.cache_dir={cache}"])
print(warm_started_model_dir(cfg.model, cfg.task, cfg.warm_start))
"""


def _start(cache: Path, steps: int) -> subprocess.Popen:
    code = SCRIPT.format(steps=steps, cache=cache)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip


def test_two_runs_started_together_prepare_one_warm_start(tmp_path):
    procs = [_start(tmp_path, 60) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-800:] for o in outs]
    assert outs[0][0] == outs[1][0]  # the same directory
    assert sum(o[1].count("preparing the warm-started") for o in outs) == 1  # one of them waited and reused it
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_sigterm_during_preparation_removes_the_temporary_directory(tmp_path):
    proc = _start(tmp_path, 100_000)  # far longer than the test waits
    deadline = time.monotonic() + 300
    while not [p for p in tmp_path.glob(".*") if p.is_dir()] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in tmp_path.glob(".*") if p.is_dir()], "the preparation never started"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # neither a temporary nor a final directory
