"""The baselines DPPO is compared with (spec "Baselines"), registered in the same registry as the DPPO modes.

Each is a short pure function of a `TokenView` returning `TrustRegion(keep, weight)`: same ratio r = π/μ, same
truncation C, same surrogate (Eq. 11) and aggregation as DPPO, so the comparison isolates the trust region.
"""

from __future__ import annotations

import math

import torch

from nemo_dppo.losses.dppo import (
    TokenView,
    TrustRegion,
    binary_kl,
    binary_tv,
    clamped_log_ratio,
    dppo_region,
    register_mode,
)


@register_mode("dppo_binary_tv_decoupled", needs_old_logprobs=True)
def dppo_binary_tv_decoupled(view: TokenView) -> TrustRegion:
    """Figure 4's ablation: Binary-TV (Eq. 13) measured against the recomputed π_old instead of μ (collapses)."""
    assert view.log_old is not None
    return dppo_region(view, view.log_old, binary_tv(view.log_old, view.log_pi), "tv")


@register_mode("dppo_binary_kl_decoupled", needs_old_logprobs=True)
def dppo_binary_kl_decoupled(view: TokenView) -> TrustRegion:
    """Figure 4's ablation: Binary-KL (Eq. 14) measured against π_old."""
    assert view.log_old is not None
    return dppo_region(view, view.log_old, binary_kl(view.log_old, view.log_pi), "kl")


def ppo_clip_keep(view: TokenView, ratio: torch.Tensor) -> torch.Tensor:
    """PPO/GRPO clipping as a mask: drop A > 0 with r > 1+ε_high, A < 0 with r < 1−ε_low (and r > c, dual clip).

    The relax-α ablation (Sec. 6) lifts the low / high bound for tokens whose μ < α.
    """
    cfg = view.cfg
    upper: torch.Tensor | float = 1.0 + cfg.clip_high
    lower: torch.Tensor | float = 1.0 - cfg.clip_low
    if cfg.relax != "none" and cfg.relax_prob_threshold > 0:
        rare = view.mu < cfg.relax_prob_threshold
        if cfg.relax in ("high", "both"):
            upper = torch.where(rare, math.inf, upper)
        if cfg.relax in ("low", "both"):
            lower = torch.where(rare, -math.inf, lower)
    dropped = (view.positive & (ratio > upper)) | (view.negative & (ratio < lower))
    if cfg.dual_clip is not None:
        dropped |= view.negative & (ratio > cfg.dual_clip)
    return ~dropped


@register_mode("ppo_clip")
def ppo_clip(view: TokenView) -> TrustRegion:
    """GRPO's clipped surrogate (clip-higher via ε_low ≠ ε_high, optional dual clip) on r = π/μ."""
    return TrustRegion(ppo_clip_keep(view, view.ratio), view.truncated_ratio)


@register_mode("minirl", needs_old_logprobs=True)
def minirl(view: TokenView) -> TrustRegion:
    """MiniRL: the `ppo_clip` mask on π/π_old (recomputed anchor), weight π/μ."""
    assert view.log_old is not None
    old_ratio = torch.exp(clamped_log_ratio(view.log_pi, view.log_old))
    return TrustRegion(ppo_clip_keep(view, old_ratio), view.truncated_ratio)


@register_mode("cispo")
def cispo(view: TokenView) -> TrustRegion:
    """CISPO (= PG-TIS): no mask; detached weight clamp(r, 1−ε_low, 1+ε_high)."""
    cfg = view.cfg
    weight = view.ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high).clamp(max=cfg.ratio_cap)
    return TrustRegion(torch.ones_like(view.valid), weight)


@register_mode("pg_is")
def pg_is(view: TokenView) -> TrustRegion:
    """Plain importance-weighted policy gradient: no mask; weight min(r, C)."""
    return TrustRegion(torch.ones_like(view.valid), view.truncated_ratio)


@register_mode("neg_mask")
def neg_mask(view: TokenView) -> TrustRegion:
    """Sec. 5.3: drop only negative-advantage tokens whose probability fell by μ − π ≥ δ (δ = 0.5)."""
    fell_by_delta = (view.mu - view.pi) >= view.cfg.neg_mask_delta
    return TrustRegion(~(view.negative & fell_by_delta), view.truncated_ratio)


@register_mode("neg_mask_decoupled", needs_old_logprobs=True)
def neg_mask_decoupled(view: TokenView) -> TrustRegion:
    """Figure 5's control: the `neg_mask` rule with the recomputed π_old as anchor (π_old − π ≥ δ)."""
    assert view.log_old is not None
    fell_by_delta = (torch.exp(view.log_old) - view.pi) >= view.cfg.neg_mask_delta
    return TrustRegion(~(view.negative & fell_by_delta), view.truncated_ratio)
