"""Every metric NeMo-RL's training loops read from the loss, by name, with where each read is in NeMo-RL's source.

Audited in NeMo-RL v0.5.0, v0.6.0, v0.7.0 and main (7ea279ab): `grpo_train`, `async_grpo_train`, `grpo_sync.py`'s
`grpo_train_sync` (v0.7+), `validate` (reads no loss metric: validation never calls the loss), the loggers
(`nemo_rl/utils/logger.py` reads only `generation_logger_metrics`, set by the loop) and the policy workers that
call the loss. A key missing from `DPPOLossFn`'s metrics is a `KeyError` after training step 1 (`gen_kl_error` was).
The table is checked against the installed NeMo-RL's source by `tests/test_nemo_rl_real.py`, which also finds any
new read; these tests need no NeMo-RL.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_dppo.losses import LOSS_MODES
from nemo_dppo.nemo_rl import data_keys as keys
from nemo_dppo.nemo_rl.loss import DPPOLossFn
from nemo_dppo.nemo_rl.loss_settings import LossSettingsError
from tests.test_nemo_rl_contract import K, global_counts, make_batch, next_token_logprobs, run_microbatches

GRPO = "nemo_rl/algorithms/grpo.py"
SYNC = "nemo_rl/algorithms/grpo_sync.py"
MEGATRON = "nemo_rl/models/policy/workers/megatron_policy_worker.py"
DTENSOR = "nemo_rl/models/policy/workers/dtensor_policy_worker.py"
DTENSOR_V2 = "nemo_rl/models/policy/workers/dtensor_policy_worker_v2.py"

#: key → version → [(file, line)] where NeMo-RL reads `metrics[key]` / `loss_metrics[key]` unconditionally.
LOOP_READS: dict[str, dict[str, list[tuple[str, int]]]] = {
    "loss": {  # the "Training Results" print of each loop; the Megatron worker's per-micro-batch losses
        "v0.5.0": [(GRPO, 1610), (GRPO, 2558), (MEGATRON, 1216)],
        "v0.6.0": [(GRPO, 2120), (GRPO, 3134), (MEGATRON, 400)],
        "v0.7.0": [(GRPO, 3046), (GRPO, 4270), (SYNC, 1242), (MEGATRON, 777)],
        "main": [(GRPO, 3705), (GRPO, 5324), (SYNC, 1300), (MEGATRON, 1022)],
    },
    "gen_kl_error": {  # print(f"  • Generation KL Error: {metrics['gen_kl_error']:.4f}")
        "v0.5.0": [(GRPO, 1611), (GRPO, 2559)],
        "v0.6.0": [(GRPO, 2123), (GRPO, 3137)],
        "v0.7.0": [(GRPO, 3049), (GRPO, 4273), (SYNC, 1245)],
        "main": [(GRPO, 3708), (GRPO, 5327), (SYNC, 1303)],
    },
    "token_mult_prob_error": {  # `if metrics["token_mult_prob_error"] > 1.05:` → plot of the worst sample
        "v0.5.0": [(GRPO, 1569)],
        "v0.6.0": [(GRPO, 2078)],
        "v0.7.0": [(GRPO, 3001), (SYNC, 1203)],
        "main": [(GRPO, 3661), (SYNC, 1259)],
    },
    "num_valid_samples": {  # the DTensor workers read it from every micro-batch's loss metrics
        "v0.5.0": [(DTENSOR, 801), (DTENSOR_V2, 864)],
        "v0.6.0": [(DTENSOR, 887), (DTENSOR_V2, 454)],
        "v0.7.0": [(DTENSOR, 916), (DTENSOR_V2, 516)],
        "main": [(DTENSOR, 943), (DTENSOR_V2, 530)],
    },
}

#: Names the loops reduce by min / max over micro-batches (everything else they sum), with the `if k in {...}` line.
REDUCED_BY_EXTREMUM: dict[str, dict[str, list[tuple[str, int]]]] = {
    "probs_ratio_min": {
        "v0.5.0": [(GRPO, 1439), (GRPO, 2405)],
        "v0.6.0": [(GRPO, 1912), (GRPO, 2962)],
        "v0.7.0": [(GRPO, 2837), (GRPO, 4087), (SYNC, 1040)],
        "main": [(GRPO, 3470), (GRPO, 5107), (SYNC, 1085)],
    },
    "probs_ratio_max": {
        "v0.5.0": [(GRPO, 1444), (GRPO, 2410)],
        "v0.6.0": [(GRPO, 1917), (GRPO, 2967)],
        "v0.7.0": [(GRPO, 2842), (GRPO, 4092), (SYNC, 1045)],
        "main": [(GRPO, 3475), (GRPO, 5112), (SYNC, 1090)],
    },
}

#: Keys those loops read that the loss does not provide: who provides them.
NOT_FROM_THE_LOSS = {
    "global_valid_toks": "added to every micro-batch's metrics by the policy worker after the loss call",
    "draft_loss": "read only under `if 'draft_loss' in metrics` (speculative-decoding draft training)",
    "generation_logger_metrics": "set by the loop from the generation backend",
    "reward": "set by the loop (only mentioned in comments of grpo_sync.py)",
}

ALL_MODES = sorted(LOSS_MODES)


def _one_step_metrics(mode: str) -> dict[str, float]:
    """One global batch through `DPPOLossFn` in micro-batches, reduced the way `grpo_train` reduces them."""
    batch = make_batch(seed=5)
    _, metrics = run_microbatches(DPPOLossFn({"mode": mode, "topk": K}), batch, micro_batch=3, api="logit")
    return metrics


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_key_the_loops_read_is_reported(mode: str) -> None:
    metrics = _one_step_metrics(mode)
    missing = [key for key in (*LOOP_READS, *REDUCED_BY_EXTREMUM) if key not in metrics]
    assert not missing, f"NeMo-RL's loops read {missing} (see LOOP_READS for where)"
    # the reads themselves, as the loops write them
    lines = [f"  • Loss: {metrics['loss']:.4f}", f"  • Generation KL Error: {metrics['gen_kl_error']:.4f}"]
    assert all("nan" not in line for line in lines)
    assert isinstance(metrics["token_mult_prob_error"] > 1.05, bool)
    assert metrics["num_valid_samples"] == float(make_batch(seed=5).data[keys.SAMPLE_MASK].sum())
    # no other name may look like an extremum: the loops would sum it
    assert all(("_min" not in k and "_max" not in k) or k in REDUCED_BY_EXTREMUM for k in metrics)


def _independent_gen_kl(data: dict[str, torch.Tensor], kl_type: str) -> float:
    """KL(μ‖π_old) per NeMo-RL's `calculate_kl(logprobs=μ, logprobs_reference=π_old)` + `masked_mean`, in float64
    with Python arithmetic per token."""
    mask = (data[keys.TOKEN_MASK][:, 1:] * data[keys.SAMPLE_MASK][:, None]).double()
    mu = data[keys.GENERATION_LOGPROBS][:, 1:].double()
    old = data[keys.PREV_LOGPROBS][:, 1:].double()
    total = 0.0
    for m, a, b in zip(mask.flatten().tolist(), mu.flatten().tolist(), old.flatten().tolist(), strict=True):
        if not m:
            continue
        log_ratio = b - a
        total += {"k1": -log_ratio, "k2": log_ratio**2 / 2, "k3": math.exp(log_ratio) - 1 - log_ratio}[kl_type]
    return total / (float(mask.sum()) + 1e-8)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_gen_kl_error_is_nemo_rls_estimate_summed_over_microbatches(kl_type: str) -> None:
    batch = make_batch(seed=8)
    loss_fn = DPPOLossFn({"mode": "dppo_binary_tv", "reference_policy_kl_type": kl_type})
    _, metrics = run_microbatches(loss_fn, batch, micro_batch=2, api="logit")
    expected = _independent_gen_kl(batch.data, kl_type)
    assert metrics["gen_kl_error"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    if kl_type == "k3":
        assert metrics["gen_kl_error"] > 0  # μ ≠ π_old in this batch


def test_gen_kl_error_is_zero_without_recomputed_logprobs_and_default_is_k3() -> None:
    batch = make_batch(seed=9)
    data = {k: v for k, v in batch.data.items() if k != keys.PREV_LOGPROBS}
    seqs, toks = global_counts(data)
    lp = next_token_logprobs(batch.logits, data[keys.INPUT_IDS])
    _, metrics = DPPOLossFn()(data=data, global_valid_seqs=seqs, global_valid_toks=toks, next_token_logprobs=lp)
    assert metrics["gen_kl_error"] == 0.0 and metrics["token_mult_prob_error"] == pytest.approx(1.0)
    assert DPPOLossFn().settings.gen_kl_type == "k3"
    with pytest.raises(LossSettingsError, match="reference_policy_kl_type='k4' must be one of k1, k2, k3"):
        DPPOLossFn({"reference_policy_kl_type": "k4"})
