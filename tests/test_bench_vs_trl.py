"""tools/bench_vs_trl.py without running a benchmark: argument parsing, token counting, the one-line error
when TRL is missing (no wall-clock time is asserted anywhere)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "bench_vs_trl.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_vs_trl_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_args_defaults_and_overrides() -> None:
    tool = _load_tool()
    args, overrides = tool.parse_args([])
    assert (args.config, args.steps, args.warmup, args.threads, args.trl_precision) == (None, 5, 1, 1, "fp32")
    # A key=value in the config slot is an override, not a file name.
    args, overrides = tool.parse_args(["train.prompts_per_step=8", "--steps", "2", "rollout.dtype=fp32"])
    assert args.config is None and args.steps == 2
    assert overrides == ["train.prompts_per_step=8", "rollout.dtype=fp32"]
    args, overrides = tool.parse_args(["conf/tiny_cpu.yaml", "seed=3"])
    assert args.config == "conf/tiny_cpu.yaml" and overrides == ["seed=3"]


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--threads", "0"], ["--warmup", "-1"], ["--bogus"]])
def test_parse_args_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _load_tool().parse_args(argv)


def test_count_generated_stops_at_first_eos_inclusive() -> None:
    eos = 2
    generated = torch.tensor([[5, 6, eos, 0, 0], [5, eos, eos, 0, 0], [5, 6, 7, 8, 9]])
    assert _load_tool().count_generated(generated, eos) == 3 + 2 + 5


def test_missing_trl_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # A `trl` package that fails to import stands in for a missing one, whatever this environment has.
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "__init__.py").write_text("raise ImportError('No module named trl')\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "1"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_vs_trl: TRL is not installed")
    assert ".[bench]" in lines[0]
