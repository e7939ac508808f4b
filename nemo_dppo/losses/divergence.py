"""Divergence estimates between the behaviour policy μ and the policy π (Section 4.4).

Every function is elementwise over leading dims, takes log-probabilities (≤ 0), returns the divergence in the
inputs' dtype, and carries no gradient requirement of its own (callers pass detached tensors for masks).
"""

from __future__ import annotations

import torch

#: Floor for a probability that appears under a log or as a bucket mass ("other", 1 − p). Keeps every estimate
#: finite when a probability is exactly 0 or 1; far below anything the mask thresholds (δ ≥ 1e-3) can see.
PROB_FLOOR = 1e-12


def binary_tv(rollout_logprobs: torch.Tensor, train_logprobs: torch.Tensor) -> torch.Tensor:
    """Binary total variation |π − μ| of the sampled token (Eq. 13)."""
    return (torch.exp(train_logprobs) - torch.exp(rollout_logprobs)).abs()


def binary_kl(rollout_logprobs: torch.Tensor, train_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(μ) ‖ Bernoulli(π)) of the sampled token (Eq. 14)."""
    log_mu, log_pi = rollout_logprobs.clamp(max=0.0), train_logprobs.clamp(max=0.0)
    return bernoulli_kl(log_mu, log_pi, torch.exp(log_mu), torch.exp(log_pi))


def bernoulli_kl(log_mu: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Eq. 14 given both log-probs (≤ 0) and probs: μ·(log μ − log π) + (1−μ)·(log(1−μ) − log(1−π)).

    1 − p = −expm1(log p) keeps its relative precision as p → 1, and is floored at PROB_FLOOR so the estimate
    stays finite when μ or π is exactly 0 or 1.
    """
    not_mu = torch.expm1(log_mu).neg_().clamp_(min=PROB_FLOOR)  # 1 − μ
    not_pi = torch.expm1(log_pi).neg_().clamp_(min=PROB_FLOOR)  # 1 − π
    second = not_pi.reciprocal_().mul_(not_mu).log_().mul_(not_mu)  # (1−μ)·log((1−μ)/(1−π)), in place
    first = torch.sub(log_mu, log_pi).mul_(mu)  # μ·(log μ − log π)
    return first.add_(second).clamp_(min=0.0)  # ≥ 0 analytically; removes −1e-9 rounding


def _check_topk_pair(topk_rollout_logprobs: torch.Tensor, topk_train_logprobs: torch.Tensor) -> None:
    if topk_rollout_logprobs.shape != topk_train_logprobs.shape:
        raise ValueError(
            f"Top-K log-prob shapes differ: rollout {tuple(topk_rollout_logprobs.shape)} vs train "
            f"{tuple(topk_train_logprobs.shape)}; expected the same [..., K] over the rollout's K token ids"
        )


def _other_bucket(probs: torch.Tensor) -> torch.Tensor:
    """The mass outside the K tokens, 1 − Σ_k p_k, floored at PROB_FLOOR."""
    return (1.0 - probs.sum(dim=-1)).clamp(min=PROB_FLOOR)


def topk_tv(topk_rollout_logprobs: torch.Tensor, topk_train_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K total variation ½ Σ|p_μ − p_π| over the K tokens plus the "other" bucket (Eq. 15)."""
    _check_topk_pair(topk_rollout_logprobs, topk_train_logprobs)
    p_mu, p_pi = torch.exp(topk_rollout_logprobs), torch.exp(topk_train_logprobs)
    in_topk = (p_mu - p_pi).abs().sum(dim=-1)
    return 0.5 * (in_topk + (_other_bucket(p_mu) - _other_bucket(p_pi)).abs())


def topk_kl(topk_rollout_logprobs: torch.Tensor, topk_train_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K KL(μ ‖ π) over the K tokens plus the "other" bucket (Eq. 16)."""
    _check_topk_pair(topk_rollout_logprobs, topk_train_logprobs)
    log_mu, log_pi = topk_rollout_logprobs.clamp(max=0.0), topk_train_logprobs.clamp(max=0.0)
    p_mu = torch.exp(log_mu)
    other_mu, other_pi = _other_bucket(p_mu), _other_bucket(torch.exp(log_pi))
    in_topk = (p_mu * (log_mu - log_pi)).sum(dim=-1)
    return (in_topk + other_mu * torch.log(other_mu / other_pi)).clamp(min=0.0)
