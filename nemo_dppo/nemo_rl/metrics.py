"""Loss metrics in NeMo-RL's micro-batch convention: each value is a share of the global batch, summed downstream.

NeMo-RL (`grpo_train`, v0.5–main) collects the metrics dict of every micro-batch and reduces each name over all of
them: `probs_ratio_min` / `probs_ratio_clamped_min` by min, `..._max` by max (skipping ±inf, the empty micro-batch
sentinel), everything else by **sum**. Its Megatron worker divides every name that does not contain `_min` / `_max`
by the number of optimiser steps in the call, so the logged value is the mean over mini-batches. A loss therefore
returns, for a token-mean metric m, `Σ_local m / global_valid_toks`: the sum over the micro-batches of one global
batch is the global-batch mean.

The loss core reports per-micro-batch means (`nemo_dppo.metrics.policy_metrics`); this module rescales them by
`n_local / global_valid_toks`. Its other extrema (|π − μ| max, divergence max) are left out: NeMo-RL would sum them.
Fractions of a subset (mask fraction among A > 0 tokens) become fractions of all tokens (`masked_pos_frac`), which
do sum correctly.
"""

from __future__ import annotations

import math

import torch

from nemo_dppo.nemo_rl.versions import MetricNormalizer

#: Core metric (a token mean) → the NeMo-RL metric name it is reported under.
TOKEN_MEAN_METRICS = {
    "mask_frac": "dppo_mask_frac",
    "ratio_mean": "probs_ratio",
    "mismatch_kl_k1": "dppo_mismatch_kl_k1",
    "mismatch_kl_k3": "dppo_mismatch_kl_k3",
    "abs_prob_diff_mean": "dppo_abs_prob_diff",
    "bad_update_frac": "dppo_bad_update_frac",
    "truncated_frac": "dppo_truncated_frac",
    "divergence_mean": "dppo_divergence",
}

#: NeMo-RL's own rollout-vs-training diagnostics, which its training loops read by name after every step.
MISMATCH_METRICS = ("token_mult_prob_error", "gen_kl_error")

#: Extrema NeMo-RL itself reduces by min / max over micro-batches (the names must stay exactly these).
EXTREMA = {"ratio_min": ("probs_ratio_min", math.inf), "ratio_max": ("probs_ratio_max", -math.inf)}


def metric_normalizations(token_level: bool) -> dict[str, object]:
    """`MetricNormalizer` per returned name (NeMo-RL main's `metric_normalizations` attribute)."""
    grad = MetricNormalizer.TOKENS if token_level else MetricNormalizer.SEQUENCES
    names: dict[str, object] = {"loss": grad, "num_valid_samples": MetricNormalizer.NONE}
    names.update(dict.fromkeys(TOKEN_MEAN_METRICS.values(), MetricNormalizer.TOKENS))
    shares = ("dppo_masked_pos_frac", "dppo_masked_neg_frac", *MISMATCH_METRICS)
    names.update(dict.fromkeys(shares, MetricNormalizer.TOKENS))
    names.update({name: MetricNormalizer.NONE for name, _ in EXTREMA.values()})
    return names


def nemo_rl_metrics(
    core: dict[str, float],
    *,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    sample_mask: torch.Tensor,
    global_valid_toks: float,
    mismatch: dict[str, float],
) -> dict[str, float]:
    """Rescale the loss core's micro-batch metrics to shares of the global batch (see the module docstring).

    `mask` [B, T] and `advantages` [B, T] are the micro-batch's response mask and advantages;
    `mismatch` holds NeMo-RL's own diagnostics (`mismatch_metrics`, already shares), which `grpo_train` reads.
    """
    valid = mask.bool()
    n_local = core["num_tokens"]
    n_pos = float((valid & (advantages > 0)).sum())
    n_neg = float((valid & (advantages < 0)).sum())
    per_global = 1.0 / (float(global_valid_toks) + 1e-8)  # NeMo-RL's masked_mean adds the same 1e-8

    out: dict[str, float] = {"loss": core["loss"]}
    for name, reported in TOKEN_MEAN_METRICS.items():
        if name in core:
            out[reported] = core[name] * n_local * per_global
    out["dppo_masked_pos_frac"] = core["mask_frac_pos"] * n_pos * per_global
    out["dppo_masked_neg_frac"] = core["mask_frac_neg"] * n_neg * per_global
    for name, (reported, empty) in EXTREMA.items():
        out[reported] = core[name] if n_local > 0 else empty
    out.update(mismatch)
    out["num_valid_samples"] = float(sample_mask.sum())
    return out


def mismatch_metrics(
    generation_logprobs: torch.Tensor,
    prev_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    global_valid_toks: float,
    kl_type: str = "k3",
) -> dict[str, float]:
    """NeMo-RL's `token_mult_prob_error` and `gen_kl_error` of one micro-batch, as shares of the global batch.

    As `ClippedPGLossFn` computes them (v0.5–main): with m the mask, N the global valid tokens (+1e-8) and
    lr = log π_old − log μ, `token_mult_prob_error = Σ exp(|lr|·m)·m / N` (1 per token when equal) and
    `gen_kl_error = Σ kl(lr)·m / N` with `calculate_kl`'s estimator `kl_type` (k1 −lr, k2 lr²/2, k3 e^lr − 1 − lr,
    unclamped): KL(μ‖π_old), the generation-vs-training mismatch. Without `prev_logprobs` (NeMo-RL's
    `force_on_policy_ratio` path) both errors are zero: 1 per valid token and 0.
    """
    m = mask.to(generation_logprobs.dtype)
    denominator = float(global_valid_toks) + 1e-8  # NeMo-RL's masked_mean adds the same 1e-8
    if prev_logprobs is None:
        return {"token_mult_prob_error": float(m.sum()) / denominator, "gen_kl_error": 0.0}
    valid = mask.bool()
    log_ratio = torch.where(valid, prev_logprobs - generation_logprobs, 0)
    if kl_type == "k1":
        kl = -log_ratio
    elif kl_type == "k2":
        kl = log_ratio.square() / 2
    elif kl_type == "k3":
        kl = torch.exp(log_ratio) - 1 - log_ratio
    else:
        raise ValueError(f"unknown KL estimator {kl_type!r}; valid: k1, k2, k3")
    mult = (torch.exp(log_ratio.abs() * m) * m).sum()
    return {"token_mult_prob_error": float(mult) / denominator, "gen_kl_error": float((kl * m).sum()) / denominator}
