"""Per-batch diagnostics of the policy loss (spec "Metrics worth logging"; a leaf: imports only torch).

Means, fractions, mins and maxes are over the batch's valid tokens; an empty batch gives 0, without a host sync.
Every dict of values leaves the device in one transfer (`reduce_metrics`). The keys are the names written to
metrics.jsonl: keep them stable so runs stay comparable.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

#: A "bad update" (Figure 5): a negative-advantage token whose probability already fell by at least this much.
BAD_UPDATE_PROB_DROP = 0.5


class TokenQuantities(Protocol):
    """What the metrics read of a `TokenView` (all [B, T], padding already 0)."""

    valid: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    log_ratio: torch.Tensor
    ratio: torch.Tensor
    pi: torch.Tensor
    mu: torch.Tensor
    binary_tv: torch.Tensor
    cfg: Any


class ValidTokens:
    """Reductions over the valid tokens of a [B, T] grid, as 0-dim tensors."""

    def __init__(self, valid: torch.Tensor) -> None:
        self.valid = valid
        self.count = torch.count_nonzero(valid)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.valid, x, 0).sum() / self.count.clamp(min=1)

    def min(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.count > 0, torch.where(self.valid, x, torch.inf).amin(), 0)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.count > 0, torch.where(self.valid, x, -torch.inf).amax(), 0)


def frac(selected: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """|selected| / |within| (0 when `within` is empty); `within` is a bool mask or its count."""
    count = within if within.dim() == 0 else torch.count_nonzero(within)
    return torch.count_nonzero(selected) / count.clamp(min=1)


def reduce_metrics(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors → Python floats, in one device→host transfer."""
    names = list(values)
    numbers = torch.stack([v.to(torch.float64) for v in values.values()]).tolist()
    return dict(zip(names, numbers, strict=True))


def mismatch_values(tokens: ValidTokens, log_ratio: torch.Tensor, binary_tv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training–inference mismatch: k1, k3 estimates of KL(μ ‖ π) from tokens sampled by μ, and |π − μ|.

    log_ratio = log π − log μ (clamped); k1 = mean(−log r), k3 = mean(r − 1 − log r) with r − 1 = expm1(log r).
    """
    return {
        "mismatch_kl_k1": tokens.mean(-log_ratio),
        "mismatch_kl_k3": tokens.mean(torch.expm1(log_ratio) - log_ratio),
        "abs_prob_diff_mean": tokens.mean(binary_tv),
        "abs_prob_diff_max": tokens.max(binary_tv),
    }


def policy_metrics(view: TokenQuantities, keep: torch.Tensor, divergence: torch.Tensor | None) -> dict[str, float]:
    """Mask fractions, ratio range, μ‖π mismatch (k1, k3, |π − μ|), bad-update and truncation fractions.

    `keep` is the mode's mask M, `divergence` the D it thresholded (None for ratio modes).
    """
    valid = view.valid
    tokens = ValidTokens(valid)
    masked = valid & ~keep
    pos = valid & view.positive
    neg = valid & view.negative
    mismatch = mismatch_values(tokens, view.log_ratio, view.binary_tv)
    values: dict[str, torch.Tensor] = {
        "mask_frac": frac(masked, tokens.count),
        "mask_frac_pos": frac(masked & pos, pos),
        "mask_frac_neg": frac(masked & neg, neg),
        "ratio_min": tokens.min(view.ratio),
        "ratio_mean": tokens.mean(view.ratio),
        "ratio_max": tokens.max(view.ratio),
        **mismatch,
        "bad_update_frac": frac(neg & (view.mu - view.pi >= BAD_UPDATE_PROB_DROP), tokens.count),
        "truncated_frac": frac(valid & (view.ratio > view.cfg.ratio_cap), tokens.count),
        "num_tokens": tokens.count,
    }
    if divergence is view.binary_tv:  # Binary-TV thresholds |π − μ| itself: its reductions are already there
        values["divergence_mean"] = mismatch["abs_prob_diff_mean"]
        values["divergence_max"] = mismatch["abs_prob_diff_max"]
    elif divergence is not None:
        values["divergence_mean"] = tokens.mean(divergence)
        values["divergence_max"] = tokens.max(divergence)
    return reduce_metrics(values)
