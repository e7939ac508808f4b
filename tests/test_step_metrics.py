"""π_old recompute auto vs always, on-policy metrics from the first mini-batch, dropped tokens, sampled eval."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nemo_dppo.config import ConfigError
from nemo_dppo.losses import LOSS_MODES, LossConfig, PolicyLossInput, compute_policy_loss
from nemo_dppo.run_logger import read_metrics
from nemo_dppo.step_metrics import DroppedTokenLog, dropped_mask, read_dropped_tokens
from nemo_dppo.trainer import train

#: Metrics that legitimately differ without the recompute: measured on the first mini-batch instead of the batch.
ON_POLICY = ("mismatch/", "entropy/mean", "routing/", "time/")


def _batch(seed: int, mode: str) -> PolicyLossInput:
    g = torch.Generator().manual_seed(seed)
    b, t, k = 6, 9, 4
    log_mu = -torch.rand(b, t, generator=g) * 3
    log_pi = log_mu + torch.randn(b, t, generator=g) * 0.6
    topk_mu = torch.log_softmax(torch.randn(b, t, k, generator=g), -1)
    topk_pi = torch.log_softmax(topk_mu + 0.3 * torch.randn(b, t, k, generator=g), -1)
    mask = torch.rand(b, t, generator=g) > 0.2
    return PolicyLossInput(log_pi.clamp(max=0), log_mu, torch.randn(b, generator=g), mask,
                           old_logprobs=(log_mu + 0.1 * torch.randn(b, t, generator=g)).clamp(max=0),
                           topk_rollout_logprobs=topk_mu, topk_train_logprobs=topk_pi)  # fmt: skip


@pytest.mark.parametrize("mode", sorted(LOSS_MODES))
def test_dropped_mask_is_the_mask_the_loss_applies(mode):
    inputs = _batch(3, mode)
    cfg = LossConfig(mode=mode, delta_low=0.05, delta_high=0.05, neg_mask_delta=0.2)
    _, metrics = compute_policy_loss(inputs, cfg)
    dropped = dropped_mask(inputs, cfg)
    assert not (dropped & ~inputs.response_mask).any()
    assert float(dropped.sum()) / float(inputs.response_mask.sum()) == pytest.approx(metrics["mask_frac"], abs=1e-7)
    # a dropped token gets no gradient; a kept one with A != 0 does
    lp = inputs.logprobs.clone().requires_grad_()
    loss, _ = compute_policy_loss(PolicyLossInput(**{**inputs.__dict__, "logprobs": lp}), cfg)
    loss.backward()
    assert (lp.grad[dropped] == 0).all()


def test_dropped_token_log_is_truncated_on_resume(tmp_path):
    log = DroppedTokenLog(tmp_path, -1)
    for step in (1, 2, 3):
        log.log(step, {"7": step})
    DroppedTokenLog(tmp_path, 2)  # resumed from the checkpoint of step 2
    assert [r["step"] for r in read_dropped_tokens(tmp_path)] == [1, 2]
    DroppedTokenLog(tmp_path, -1)  # a fresh run starts empty
    assert read_dropped_tokens(tmp_path) == []


def test_never_recompute_refuses_modes_that_read_pi_old():
    from nemo_dppo.config import load_config

    with pytest.raises(ConfigError, match=r"loss\.mode=minirl reads log π_old"):
        load_config(None, ["loss.mode=minirl", "train.recompute_old_logprobs=never"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dppo_binary_tv", "ppo_clip"])
def test_auto_equals_always_except_the_on_policy_metrics(tiny_config, tmp_path, mode):
    runs = {}
    for setting in ("always", "auto"):
        cfg = tiny_config(f"loss.mode={mode}", f"train.recompute_old_logprobs={setting}",
                          f"run_dir={tmp_path / setting}", "eval.k=2")  # fmt: skip
        train(cfg)
        runs[setting] = read_metrics(Path(cfg.run_dir))
    always, auto = runs["always"], runs["auto"]
    assert len(always) == len(auto) == 4
    compared = 0
    for a, b in zip(always, auto, strict=True):
        assert ("time/logprob" in a, "time/logprob" in b) == (a["step"] > 0, False)
        for key in a:
            if key.startswith(ON_POLICY):
                assert key.startswith("time/") or key in b  # still reported, from the first mini-batch
                continue
            same = a[key] == b[key] or (isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key]))
            assert same, (a["step"], key, a[key], b[key])
            compared += 1
    assert compared > 60
    for r in auto:
        if "eval/avg@2" in r:
            assert 0 <= r["eval/avg@2"] <= r["eval/pass@2"] <= 1
