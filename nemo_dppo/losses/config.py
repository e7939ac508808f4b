"""`LossConfig`: the `loss:` section of a run config, with the paper's defaults (spec "Defaults")."""

from __future__ import annotations

from dataclasses import dataclass

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RELAX_CHOICES = ("none", "low", "high", "both")

#: δ when `delta_low` / `delta_high` are unset: by the divergence the mode measures (spec "Defaults").
DEFAULT_DELTA = {"tv": 0.15, "kl": 0.05}


@dataclass
class LossConfig:
    """Hyper-parameters of every loss mode. Fields a mode does not use are ignored by it.

    mode:            a name from `nemo_dppo.losses.LOSS_MODES`.
    delta_low/high:  DPPO divergence thresholds δ for A ≤ 0 / A > 0 (Eq. 12); None → 0.15 (TV) / 0.05 (KL).
    clip_low/high:   PPO ratio range ε (GRPO 0.2/0.2, clip-higher 0.2/0.28); also `minirl` and `cispo` bounds.
    dual_clip:       dual-clip c > 1 for `ppo_clip` (tokens with A < 0 and r > c are masked); None = off.
    ratio_cap:       truncated-IS cap C on the weight min(r, C) (Eq. 11); 1e4 = off in practice.
    agg:             loss aggregation (spec "Aggregation"); masked tokens stay in the denominator.
    max_response_len: denominator length of `seq-mean-token-sum-norm` (Dr.GRPO); None → the batch's T.
    relax_prob_threshold, relax: the relax-α ablation of `ppo_clip` (Sec. 6): tokens with μ < α lose their
                     low / high / both ratio bounds.
    neg_mask_delta:  δ of the `neg_mask` mode (Sec. 5.3): mask A < 0 tokens with μ − π ≥ δ.
    validate:        check inputs (shapes, NaN/inf, log-probs ≤ 0) on every call.
    """

    mode: str = "dppo_binary_tv"
    delta_low: float | None = None
    delta_high: float | None = None
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    ratio_cap: float = 1e4
    agg: str = "token-mean"
    max_response_len: int | None = None
    relax_prob_threshold: float = 0.0
    relax: str = "none"
    neg_mask_delta: float = 0.5
    validate: bool = True

    def __post_init__(self) -> None:
        # Imported here: the registry imports this module.
        from nemo_dppo.losses.modes import get_mode

        get_mode(self.mode)  # unknown mode → ValueError listing the valid ones
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"loss.agg={self.agg!r} is not one of {', '.join(AGGREGATIONS)}")
        if self.relax not in RELAX_CHOICES:
            raise ValueError(f"loss.relax={self.relax!r} is not one of {', '.join(RELAX_CHOICES)}")
        for name in ("delta_low", "delta_high"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"loss.{name}={value} must be > 0 (a divergence threshold δ)")
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"loss.clip_low={self.clip_low} must be in [0, 1) (ratio lower bound 1 − ε_low > 0)")
        if not self.clip_high >= 0:
            raise ValueError(f"loss.clip_high={self.clip_high} must be ≥ 0")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"loss.dual_clip={self.dual_clip} must be > 1 (or null to disable)")
        if not self.ratio_cap > 0:
            raise ValueError(f"loss.ratio_cap={self.ratio_cap} must be > 0 (C of the truncated IS weight)")
        if self.max_response_len is not None and not self.max_response_len > 0:
            raise ValueError(f"loss.max_response_len={self.max_response_len} must be a positive token count")
        if not 0 <= self.relax_prob_threshold <= 1:
            raise ValueError(f"loss.relax_prob_threshold={self.relax_prob_threshold} must be a probability")
        if not self.neg_mask_delta > 0:
            raise ValueError(f"loss.neg_mask_delta={self.neg_mask_delta} must be > 0")

    def deltas(self, divergence: str) -> tuple[float, float]:
        """(δ_low, δ_high) for a mode measuring `divergence` ("tv" or "kl"), defaults filled in."""
        default = DEFAULT_DELTA[divergence]
        low = default if self.delta_low is None else self.delta_low
        high = default if self.delta_high is None else self.delta_high
        return low, high
