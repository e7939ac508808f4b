"""The trust-region modes: each decides, per token and without gradient, a keep mask M and an IS weight w.

Every mode plugs into the same surrogate (Eq. 11), L_t = −A_t · M_t · w_t with ∂L_t/∂logπ_t = −A_t · M_t · w_t,
so a new mode is one function decorated with `@register_mode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nemo_dppo.losses.divergence import bernoulli_kl, binary_kl, binary_tv, topk_kl, topk_tv
from nemo_dppo.losses.token_view import TokenView


@dataclass
class TrustRegion:
    """A mode's decision. `keep` is M (bool); `weight` is w; `divergence` is the D the mask thresholded."""

    keep: torch.Tensor
    weight: torch.Tensor
    divergence: torch.Tensor | None = None


ModeFn = Callable[[TokenView], TrustRegion]


@dataclass(frozen=True)
class LossMode:
    name: str
    fn: ModeFn
    needs_old_logprobs: bool = False
    needs_topk: bool = False


LOSS_MODES: dict[str, LossMode] = {}


def register_mode(
    name: str, *, needs_old_logprobs: bool = False, needs_topk: bool = False
) -> Callable[[ModeFn], ModeFn]:
    """Register a trust-region mode under `name` (its `loss.mode` config value)."""

    def decorator(fn: ModeFn) -> ModeFn:
        if name in LOSS_MODES:
            raise ValueError(f"loss mode {name!r} is registered twice")
        LOSS_MODES[name] = LossMode(name, fn, needs_old_logprobs, needs_topk)
        return fn

    return decorator


def get_mode(name: str) -> LossMode:
    try:
        return LOSS_MODES[name]
    except KeyError:
        raise ValueError(f"unknown loss.mode {name!r}; valid modes: {', '.join(sorted(LOSS_MODES))}") from None


# --- DPPO (Eq. 12) -------------------------------------------------------------------------------------------


def dppo_keep(
    view: TokenView, log_anchor: torch.Tensor, divergence: torch.Tensor, divergence_name: str
) -> torch.Tensor:
    """Eq. 12: drop a token only when the update moves π away from the anchor and D exceeds δ.

    A > 0 and π > anchor and D > δ_high, or A ≤ 0 and π < anchor and D > δ_low (strict comparisons).
    """
    delta_low, delta_high = view.cfg.deltas(divergence_name)
    away_up = view.positive & (view.log_pi > log_anchor) & (divergence > delta_high)
    away_down = ~view.positive & (view.log_pi < log_anchor) & (divergence > delta_low)
    return ~(away_up | away_down)


def _dppo(view: TokenView, log_anchor: torch.Tensor, divergence: torch.Tensor, name: str) -> TrustRegion:
    return TrustRegion(dppo_keep(view, log_anchor, divergence, name), view.truncated_ratio, divergence)


@register_mode("dppo_binary_tv")
def dppo_binary_tv(view: TokenView) -> TrustRegion:
    """DPPO with Binary-TV |π − μ| (Eq. 13), anchored at the rollout policy μ."""
    return _dppo(view, view.log_mu, view.abs_prob_diff, "tv")


@register_mode("dppo_binary_kl")
def dppo_binary_kl(view: TokenView) -> TrustRegion:
    """DPPO with Binary-KL (Eq. 14), anchored at μ."""
    return _dppo(view, view.log_mu, bernoulli_kl(view.log_mu, view.log_pi, view.mu, view.pi), "kl")


@register_mode("dppo_topk_tv", needs_topk=True)
def dppo_topk_tv(view: TokenView) -> TrustRegion:
    """DPPO with Top-K TV (Eq. 15) over TopK(μ) ∪ {a_t} plus "other"; direction from the sampled token."""
    assert view.topk_log_mu is not None and view.topk_log_pi is not None
    return _dppo(view, view.log_mu, topk_tv(view.topk_log_mu, view.topk_log_pi), "tv")


@register_mode("dppo_topk_kl", needs_topk=True)
def dppo_topk_kl(view: TokenView) -> TrustRegion:
    """DPPO with Top-K KL(μ‖π) (Eq. 16)."""
    assert view.topk_log_mu is not None and view.topk_log_pi is not None
    return _dppo(view, view.log_mu, topk_kl(view.topk_log_mu, view.topk_log_pi), "kl")


@register_mode("dppo_binary_tv_decoupled", needs_old_logprobs=True)
def dppo_binary_tv_decoupled(view: TokenView) -> TrustRegion:
    """Figure 4's ablation: Binary-TV measured against the recomputed π_old instead of μ (collapses)."""
    assert view.log_old is not None
    return _dppo(view, view.log_old, binary_tv(view.log_old, view.log_pi), "tv")


@register_mode("dppo_binary_kl_decoupled", needs_old_logprobs=True)
def dppo_binary_kl_decoupled(view: TokenView) -> TrustRegion:
    """Figure 4's ablation: Binary-KL measured against π_old."""
    assert view.log_old is not None
    return _dppo(view, view.log_old, binary_kl(view.log_old, view.log_pi), "kl")


# --- Ratio-clipping baselines --------------------------------------------------------------------------------


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
    return TrustRegion(ppo_clip_keep(view, view.old_ratio), view.truncated_ratio)


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
