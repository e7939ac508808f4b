"""`TokenView`: the detached per-token quantities every trust-region mode and metric reads, computed once.

All tensors are [B, T] (Top-K: [B, T, K]) in the working dtype (fp32, or fp64 when the inputs are fp64), with
padding positions already replaced by 0 so that no garbage there can reach a mask, a weight or a metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from nemo_dppo.losses.config import LossConfig

#: The log-ratio is clamped to this range before exponentiation (spec "Notation").
LOG_RATIO_CLAMP = 20.0


@dataclass(eq=False)
class TokenView:
    log_pi: torch.Tensor  # log π(a_t), detached
    log_mu: torch.Tensor  # log μ(a_t) of the rollout engine (the DPPO anchor)
    advantages: torch.Tensor  # A_t
    valid: torch.Tensor  # bool response mask
    cfg: LossConfig
    log_old: torch.Tensor | None = None  # log π_old(a_t), recomputed by the trainer (decoupled modes)
    topk_log_mu: torch.Tensor | None = None  # [B, T, K] log μ at the rollout's K ids
    topk_log_pi: torch.Tensor | None = None  # [B, T, K] log π at the same ids

    @cached_property
    def log_ratio(self) -> torch.Tensor:
        """log r = log π − log μ, clamped to ±20."""
        return (self.log_pi - self.log_mu).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)

    @cached_property
    def ratio(self) -> torch.Tensor:
        """r = π / μ (Eq. 11)."""
        return torch.exp(self.log_ratio)

    @cached_property
    def old_ratio(self) -> torch.Tensor:
        """π / π_old, for `minirl`."""
        assert self.log_old is not None
        return torch.exp((self.log_pi - self.log_old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    @cached_property
    def pi(self) -> torch.Tensor:
        return torch.exp(self.log_pi)

    @cached_property
    def mu(self) -> torch.Tensor:
        return torch.exp(self.log_mu)

    @cached_property
    def abs_prob_diff(self) -> torch.Tensor:
        """|π − μ|: the Binary-TV estimate (Eq. 13), also a mismatch metric."""
        return (self.pi - self.mu).abs()

    @cached_property
    def positive(self) -> torch.Tensor:
        return self.advantages > 0

    @cached_property
    def negative(self) -> torch.Tensor:
        return self.advantages < 0

    @cached_property
    def truncated_ratio(self) -> torch.Tensor:
        """min(r, C): the importance weight every ratio-weighted mode uses (Eq. 11, truncation)."""
        return self.ratio.clamp(max=self.cfg.ratio_cap)
