"""`nemo-dppo train` with `train.backend=megatron`: a short DPPO run at EP=2 (2 ranks started by the command
itself), its sharded checkpoints, SIGKILL + resume reproducing the uninterrupted run, and one-line user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_dppo.megatron import megatron_backend_installed

if not megatron_backend_installed():
    pytest.skip("the Megatron backend needs megatron-core and megatron-bridge", allow_module_level=True)

from nemo_dppo.config import CONF_DIR, load_config
from nemo_dppo.run_logger import read_metrics

EP2 = ["train.backend=megatron", "train.megatron.ep=2", "steps=6", "save_every=2", "eval_every=3"]


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nemo_dppo.cli", "train", *args], env=env, **kwargs)


def _no_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def _launched_ranks(run_dir: Path) -> list[int]:
    """PIDs of rank processes still running for `run_dir` (their config file lives in it)."""
    out = subprocess.run(["pgrep", "-f", f"nemo_dppo.launch train {run_dir}"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, warm_start_cache: Path) -> tuple[Path, list[str]]:
    from tests.conftest import TINY_TEST_OVERRIDES

    run_dir = tmp_path_factory.mktemp("megatron_ep2") / "reference"
    args = [*TINY_TEST_OVERRIDES, f"warm_start.cache_dir={warm_start_cache}", *EP2]
    proc = _cli([*args, f"run_dir={run_dir}"])
    assert proc.wait(timeout=600) == 0
    return run_dir, args


def test_config_file_is_an_ep2_job():
    cfg = load_config(CONF_DIR / "tiny_cpu_megatron.yaml")
    assert cfg.train.backend == "megatron" and cfg.train.megatron.ep == 2 and cfg.train.megatron.world_size == 2


@pytest.mark.slow
def test_short_dppo_run_with_ep2(reference_run):
    run_dir, _ = reference_run
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(7))
    for key in ("reward/mean", "loss/loss", "loss/grad_norm", "mismatch/kl_k3", "routing/disagreement", "time/sync"):
        assert all(key in r for r in records[1:]), key
    assert max(r["loss/grad_norm"] for r in records[1:]) > 0
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_000006"
    assert sorted(p.name for p in (latest / "megatron").iterdir()) == ["layout.json", "rank_00000.pt", "rank_00001.pt"]
    assert json.loads((latest / "megatron" / "layout.json").read_text())["ep"] == 2
    from nemo_dppo.models.tiny_moe import load_model_dir

    load_model_dir(str(latest / "model"))  # the HF export loads for evaluation
    assert not _launched_ranks(run_dir)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    reference_dir, args = reference_run
    killed_dir = tmp_path / "killed"
    proc = _cli([*args, f"run_dir={killed_dir}"])
    deadline = time.monotonic() + 300
    while (
        not any(r["step"] >= 3 for r in read_metrics(killed_dir)) if (killed_dir / "metrics.jsonl").exists() else True
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _launched_ranks(killed_dir) and time.monotonic() < deadline:  # the ranks die with the launcher
        time.sleep(0.1)
    assert not _launched_ranks(killed_dir)
    resumed_at = int((killed_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= resumed_at < 6

    assert _cli([*args, f"run_dir={killed_dir}", "resume=true"]).wait(timeout=600) == 0
    expected = [_no_times(r) for r in read_metrics(reference_dir)]
    got = [_no_times(r) for r in read_metrics(killed_dir)]
    assert [r["step"] for r in got] == list(range(7))
    assert got[resumed_at + 1 :] == expected[resumed_at + 1 :]


def test_user_errors_are_one_line(tiny_overrides):
    cases = [
        (["model.path=/does/not/exist"], "cannot load the policy from /does/not/exist"),
        (["model.num_kv_heads=1", "train.megatron.tp=2"], "tp=2 does not divide the model's num_key_value_heads=1"),
        (["train.megatron.ep=3", "train.megatron.dp=2"], "ep × etp = 3 must divide"),
    ]
    for extra, message in cases:
        proc = _cli([*tiny_overrides, "train.backend=megatron", *extra], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)  # fmt: skip
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
