"""Training precision: fp16 dynamic loss scaling on both backends (an overflow step is skipped and the scale backs
off; the next clean step applies), bf16 on the Megatron backend, and the `precision.match_rollout` shortcut.

The overflow is injected with a hook that turns the gradient of the LM head's output into inf; torch's GradScaler
(`hf`) and megatron-core's DynamicGradScaler (`megatron`) must both detect it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_dppo.config import TrainConfig, load_config
from nemo_dppo.engines.hf_training import HFTrainingEngine
from nemo_dppo.losses import LossConfig
from nemo_dppo.megatron import megatron_backend_installed
from nemo_dppo.megatron.parity import make_policy_dirs, rollout_batch
from nemo_dppo.models.tiny_moe import load_model_dir

ROOT = Path(__file__).resolve().parent.parent
LOSS = LossConfig(mode="dppo_binary_tv")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_policy_dirs(tmp_path_factory.mktemp("precision_policy"))[0]


def _inf_gradient(module: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """A forward hook making d loss / d (module output) infinite (tuple outputs: the first element)."""

    def hook(_module: torch.nn.Module, _inputs: tuple, output):
        tensor = output[0] if isinstance(output, tuple) else output
        tensor.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return output

    return module.register_forward_hook(hook)


def _steps_until_applied(engine, batch, start_scale: float, max_steps: int = 12) -> dict[str, float]:
    """Clean steps until one applies. This tiny fp16 model also overflows by itself at large scales: every such
    step must be skipped with the scale halved, until the scale is small enough."""
    scale = start_scale
    for _ in range(max_steps):
        metrics = engine.train_step(batch, LOSS).metrics
        assert metrics["loss_scale"] == scale
        if metrics["skipped_step"] == 0.0:
            return metrics
        scale /= 2
    raise AssertionError(f"no fp16 step applied in {max_steps} steps")


def _prepared_batch(policy_dir: Path, engine) -> object:
    batch = rollout_batch(policy_dir)
    batch.old_logprobs = engine.compute_logprobs(batch).token.logprobs
    return batch


def test_match_rollout_sets_the_rollout_dtype():
    cfg = load_config(None, ["train.precision=fp16", "precision.match_rollout=true"])
    assert cfg.rollout.dtype == "fp16" and cfg.train.precision == "fp16"
    assert load_config(None, ["train.precision=fp16"]).rollout.dtype == "bf16"  # off: unchanged


def test_hf_fp16_overflow_skips_the_step_and_backs_off(policy_dir):
    model, _ = load_model_dir(str(policy_dir))
    engine = HFTrainingEngine(model, TrainConfig(precision="fp16", lr=1e-3, mini_batches=1))
    batch = _prepared_batch(policy_dir, engine)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = _inf_gradient(model.lm_head)
    try:
        metrics = engine.train_step(batch, LOSS).metrics
    finally:
        handle.remove()
    assert metrics["skipped_step"] == 1.0 and metrics["loss_scale"] == 2.0**16
    assert engine.scaler.get_scale() == 2.0**15  # backed off
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing applied
    applied = _steps_until_applied(engine, batch, start_scale=2.0**15)
    assert applied["grad_norm"] < float("inf")
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def megatron_worker(policy_dir: str, out: str) -> None:
    """Runs in a fresh process (world-1 process group): fp16 overflow + recovery, then a bf16 step."""
    from nemo_dppo.engines.megatron_training import MegatronTrainingEngine, unwrap

    report = {}
    engine = MegatronTrainingEngine(policy_dir, TrainConfig(backend="megatron", precision="fp16", lr=1e-3))
    batch = _prepared_batch(Path(policy_dir), engine)
    before = [p.detach().clone() for p in engine.model.parameters()]
    handle = _inf_gradient(unwrap(engine.model).output_layer)
    try:
        first = engine.train_step(batch, LOSS).metrics
    finally:
        handle.remove()
    report["first"] = {k: first[k] for k in ("skipped_step", "loss_scale")}
    report["scale_after_overflow"] = engine.loss_scale()
    params = list(engine.model.parameters())
    report["unchanged_after_overflow"] = all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    second = _steps_until_applied(engine, batch, start_scale=2.0**15)
    report["second"] = {k: second[k] for k in ("skipped_step", "loss_scale", "grad_norm")}
    report["changed_after_clean_step"] = any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))

    bf16 = MegatronTrainingEngine(policy_dir, TrainConfig(backend="megatron", precision="bf16", lr=1e-3))
    report["bf16_param_dtype"] = str(next(bf16.model.parameters()).dtype)
    old = bf16.compute_logprobs(batch).token.logprobs
    report["bf16_logprob_error"] = float((old - batch.old_logprobs)[batch.response_mask].abs().max())
    bf16_metrics = bf16.train_step(batch, LOSS).metrics
    report["bf16_grad_norm"] = bf16_metrics["grad_norm"]
    report["bf16_has_no_loss_scale"] = "loss_scale" not in bf16_metrics
    Path(out).write_text(json.dumps(report))


def test_megatron_fp16_overflow_skips_the_step_and_backs_off_and_bf16_trains(policy_dir, tmp_path):
    if not megatron_backend_installed():
        pytest.skip("the Megatron backend needs megatron-core and megatron-bridge")
    out = tmp_path / "report.json"
    code = f"from tests.test_precision import megatron_worker; megatron_worker({str(policy_dir)!r}, {str(out)!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["first"] == {"skipped_step": 1.0, "loss_scale": 2.0**16}
    assert report["scale_after_overflow"] == 2.0**15 and report["unchanged_after_overflow"]
    assert report["second"]["skipped_step"] == 0.0 and report["second"]["loss_scale"] <= 2.0**15
    assert 0 < report["second"]["grad_norm"] < float("inf") and report["changed_after_clean_step"]
    assert report["bf16_param_dtype"] == "torch.bfloat16" and report["bf16_has_no_loss_scale"]
    assert report["bf16_logprob_error"] < 0.5 and 0 < report["bf16_grad_norm"] < float("inf")
