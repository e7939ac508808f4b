"""`compute_policy_loss`: the surrogate of Eq. 11 with any registered trust-region mode.

    L_t = −A_t · M_t · w_t          value in the paper's form (w = min(r, C) for ratio modes, r = π/μ)
    ∂L_t / ∂logπ_t = −A_t · M_t · w_t

Implemented as L_t = c_t · (1 + logπ_t − sg(logπ_t)) with the detached coefficient c_t = −A_t · M_t · w_t: the
value is exactly c_t and the gradient exactly c_t, whatever the mode (no exp on the gradient path).
"""

from __future__ import annotations

import torch

from nemo_dppo.losses.aggregation import aggregate_loss
from nemo_dppo.losses.config import LossConfig
from nemo_dppo.losses.input_checks import check_policy_loss_inputs
from nemo_dppo.losses.modes import get_mode
from nemo_dppo.losses.token_view import TokenView
from nemo_dppo.metrics import policy_metrics


def compute_policy_loss(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    old_logprobs: torch.Tensor | None = None,
    topk_rollout_logprobs: torch.Tensor | None = None,
    topk_train_logprobs: torch.Tensor | None = None,
    global_num_tokens: float | torch.Tensor | None = None,
    global_num_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss and its metrics for one (micro-)batch.

    logprobs [B, T]           log π of the sampled tokens, with gradient (the only input that has one)
    rollout_logprobs [B, T]   log μ from the rollout engine
    advantages [B] or [B, T]  A (sequence-level advantages are broadcast over tokens)
    mask [B, T]               response mask (bool or 0/1)
    old_logprobs [B, T]       log π_old recomputed before the update (decoupled modes, `minirl`)
    topk_*_logprobs [B, T, K] log μ / log π at the rollout's K token ids (Top-K modes; π without gradient)
    global_num_tokens / global_num_seqs  replace this batch's denominators (data parallelism, micro-batching)
    """
    mode = get_mode(cfg.mode)
    if cfg.validate:
        check_policy_loss_inputs(
            mode,
            logprobs=logprobs,
            rollout_logprobs=rollout_logprobs,
            advantages=advantages,
            mask=mask,
            old_logprobs=old_logprobs,
            topk_rollout_logprobs=topk_rollout_logprobs,
            topk_train_logprobs=topk_train_logprobs,
            global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs,
        )
    view = _token_view(
        logprobs, rollout_logprobs, advantages, mask, cfg, old_logprobs, topk_rollout_logprobs, topk_train_logprobs
    )
    region = mode.fn(view)
    coefficient = torch.where(region.keep & view.valid, -view.advantages * region.weight, 0)
    log_pi = torch.where(view.valid, logprobs.to(view.log_pi.dtype), 0)  # padding may hold NaN
    token_loss = coefficient * (1 + log_pi - log_pi.detach())
    loss = aggregate_loss(
        token_loss,
        view.valid,
        cfg.agg,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        max_response_len=cfg.max_response_len,
    )
    with torch.no_grad():
        metrics = policy_metrics(view, region)
        metrics["loss"] = float(loss.detach())
    return loss, metrics


def _token_view(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    old_logprobs: torch.Tensor | None,
    topk_rollout_logprobs: torch.Tensor | None,
    topk_train_logprobs: torch.Tensor | None,
) -> TokenView:
    """Detached working copies in fp32 (fp64 if π is fp64), with padding positions of the [B, T] inputs zeroed.

    Top-K tensors are only cast: whatever padding holds there can only reach comparisons and `torch.where`s that
    the response mask already excludes, and cleaning [B, T, K] would cost a full copy.
    """
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    valid = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None]

    def clean(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.where(valid, x.detach().to(dtype), 0)

    def cast(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().to(dtype)

    return TokenView(
        log_pi=clean(logprobs),
        log_mu=clean(rollout_logprobs),
        advantages=clean(advantages.expand_as(logprobs)),
        valid=valid,
        cfg=cfg,
        log_old=clean(old_logprobs),
        topk_log_mu=cast(topk_rollout_logprobs),
        topk_log_pi=cast(topk_train_logprobs),
    )
