"""Per-batch diagnostics of a policy-loss call (spec "Metrics worth logging").

Means, fractions, mins and maxes are over this batch's valid tokens. All values come back from one device→host
transfer.
"""

from __future__ import annotations

import torch

from nemo_dppo.losses.modes import TrustRegion
from nemo_dppo.losses.token_view import TokenView

#: A "bad update" (Figure 5): a negative-advantage token whose probability already fell by at least this much.
BAD_UPDATE_PROB_DROP = 0.5


def policy_metrics(view: TokenView, region: TrustRegion) -> dict[str, float]:
    """Mask fractions, ratio range, μ‖π mismatch (k1, k3, |π − μ|), bad-update and truncation fractions."""
    valid = view.valid
    n_valid = valid.sum()
    masked = valid & ~region.keep
    pos = valid & view.positive
    neg = valid & view.negative

    def frac(selected: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
        return selected.sum() / within.sum().clamp(min=1)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, 0).sum() / n_valid.clamp(min=1)

    def vmin(x: torch.Tensor) -> torch.Tensor:  # 0 for an empty batch, without a host sync
        return torch.where(n_valid > 0, torch.where(valid, x, torch.inf).amin(), 0)

    def vmax(x: torch.Tensor) -> torch.Tensor:
        return torch.where(n_valid > 0, torch.where(valid, x, -torch.inf).amax(), 0)

    # log r = log π − log μ; k1 and k3 estimate KL(μ ‖ π) from tokens sampled by μ.
    log_ratio = view.log_ratio
    values: dict[str, torch.Tensor] = {
        "mask_frac": frac(masked, valid),
        "mask_frac_pos": frac(masked & pos, pos),
        "mask_frac_neg": frac(masked & neg, neg),
        "ratio_min": vmin(view.ratio),
        "ratio_mean": mean(view.ratio),
        "ratio_max": vmax(view.ratio),
        "mismatch_kl_k1": mean(-log_ratio),
        "mismatch_kl_k3": mean(torch.expm1(log_ratio) - log_ratio),
        "abs_prob_diff_mean": mean(view.abs_prob_diff),
        "abs_prob_diff_max": vmax(view.abs_prob_diff),
        "bad_update_frac": frac(neg & (view.mu - view.pi >= BAD_UPDATE_PROB_DROP), valid),
        "truncated_frac": frac(valid & (view.ratio > view.cfg.ratio_cap), valid),
        "num_tokens": n_valid,
    }
    if region.divergence is not None:
        values["divergence_mean"] = mean(region.divergence)
        values["divergence_max"] = vmax(region.divergence)
    names = list(values)
    numbers = torch.stack([v.to(torch.float64) for v in values.values()]).tolist()
    return dict(zip(names, numbers, strict=True))
