"""The main job end to end on CPU: runs, checkpoints, resume equality, signals, R3, mismatch, user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_dppo.errors import TrainingDiverged, UserError
from nemo_dppo.run_logger import read_metrics
from nemo_dppo.trainer import Trainer, train

pytestmark = pytest.mark.slow


def _no_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/")}


@pytest.mark.parametrize("mode", ["dppo_binary_tv", "dppo_topk_kl"])
def test_end_to_end_run_writes_everything(tiny_config, mode):
    cfg = tiny_config(f"loss.mode={mode}", "rollout.logprobs_topk=5")
    last = train(cfg)
    run = Path(cfg.run_dir)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for key in ("reward/mean", "loss/loss", "loss/mask_frac", "mismatch/kl_k3", "routing/disagreement",
                "entropy/mean", "time/rollout", "time/train", "time/sync", "dropped/frac",
                "dropped/mu_mean"):  # fmt: skip
        assert all(key in r for r in records[1:]), key
    assert not any("time/logprob" in r for r in records)  # neither mode reads π_old: no recompute (auto)
    assert "loss/divergence_mean" in last
    assert max(r["loss/grad_norm"] for r in records[1:]) > 0  # some group had different rewards
    assert records[2]["eval/accuracy"] is not None and "eval/accuracy" in records[0]
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_000003" and (latest / "model" / "model.safetensors").is_file()
    assert (latest / "train.pt").is_file() and (latest / "config.yaml").is_file()
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"reward.png", "mismatch.png", "mask.png"}
    assert "report" in (run / "report.md").read_text().lower()
    assert list((run / "tensorboard").glob("events.*"))


def test_rollout_precision_drives_the_mismatch(tiny_config):
    """Same weights: fp32 rollout ≈ trainer (k3 ~ 0); bf16 rollout is measurably off."""
    out = {}
    for dtype in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(f"rollout.dtype={dtype}"))
        out[dtype] = trainer.train_one_step(1)
    assert out["fp32"]["mismatch/kl_k3"] < 1e-9 and out["fp32"]["mismatch/abs_prob_diff_max"] < 1e-4
    assert out["bf16"]["mismatch/kl_k3"] > 1e-7 and out["bf16"]["mismatch/abs_prob_diff_max"] > 1e-3
    assert out["fp32"]["routing/disagreement"] == 0.0


def test_router_replay_forces_routes_and_lowers_mismatch(tiny_config):
    """bf16 rollout vs fp32 training: R3 makes training use the rollout's experts and shrinks the mismatch."""
    base = ["rollout.dtype=bf16", "model.num_layers=4", "model.init_std=0.1", "task.num_digits=2",
            "train.prompts_per_step=16"]  # fmt: skip
    off = Trainer(tiny_config(*base, "rollout.router_replay=false")).train_one_step(1)
    on = Trainer(tiny_config(*base, "rollout.router_replay=true")).train_one_step(1)
    assert off["routing/disagreement"] > 0.005  # the bf16 router really picks other experts
    assert on["routing/disagreement"] == 0.0  # replayed == recorded
    assert on["routing/own_disagreement"] > 0  # the training router still disagrees; R3 overrides it
    assert on["mismatch/kl_k3"] < off["mismatch/kl_k3"]
    assert on["mismatch/abs_prob_diff_mean"] < off["mismatch/abs_prob_diff_mean"]


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nemo_dppo.cli", "train", *args], env=env, **kwargs)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if records and records[-1]["step"] >= step:
            return
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before step {step}"
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tiny_overrides, tmp_path):
    steps = ["steps=12", "save_every=3", "eval_every=4"]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    train_args = [*tiny_overrides, *steps]
    reference = _cli([*train_args, f"run_dir={reference_dir}"])
    assert reference.wait(timeout=600) == 0

    proc = _cli([*train_args, f"run_dir={killed_dir}"])
    _wait_for_step(killed_dir, 4, proc)  # a checkpoint at step 3 exists, step 4+ is in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed_at = int((killed_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= resumed_at < 12

    assert _cli([*train_args, f"run_dir={killed_dir}", "resume=true"]).wait(timeout=600) == 0
    expected = [_no_times(r) for r in read_metrics(reference_dir)]
    got = [_no_times(r) for r in read_metrics(killed_dir)]
    assert [r["step"] for r in got] == list(range(13))  # no duplicated or missing steps
    assert got[resumed_at + 1 :] == expected[resumed_at + 1 :]


def test_sigterm_checkpoints_and_exits_zero(tiny_overrides, tmp_path):
    run_dir = tmp_path / "preempted"
    proc = _cli([*tiny_overrides, "steps=500", "save_every=1000", f"run_dir={run_dir}"])
    _wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    last_step = read_metrics(run_dir)[-1]["step"]
    assert 2 <= last_step < 500
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{last_step:06d}"
    state = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] == last_step


def test_user_errors_are_one_line(tiny_overrides, tmp_path):
    cases = [
        (["model.path=/does/not/exist"], "cannot load the policy from /does/not/exist"),
        (["loss.mode=dppo"], "unknown loss.mode 'dppo'"),
        (["train.lrr=1"], "did you mean 'lr'"),
    ]
    for extra, message in cases:
        proc = _cli([*tiny_overrides, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_tokenizer_larger_than_model_vocab_is_a_user_error(tiny_config, tmp_path):
    from nemo_dppo.models.tiny_moe import TinyMoEConfig, build_tiny_qwen3_moe, save_model_dir
    from nemo_dppo.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = build_tiny_qwen3_moe(TinyMoEConfig(), tokenizer)
    model.resize_token_embeddings(len(tokenizer) - 5)
    save_model_dir(model, tokenizer, str(tmp_path / "model"))
    with pytest.raises(UserError, match="tokenizer has 56 tokens but the model vocab_size is 51"):
        Trainer(tiny_config(f"model.path={tmp_path / 'model'}"))


def test_nan_in_the_loss_stops_with_a_clear_error(tiny_config):
    trainer = Trainer(tiny_config())
    with torch.no_grad():
        trainer.train_engine.model.lm_head.weight[3].fill_(float("nan"))  # the rollout engine's copy stays finite
    with pytest.raises(TrainingDiverged, match="NaN/inf"):  # no π_old recompute: caught by the loss
        trainer.train_one_step(1)
