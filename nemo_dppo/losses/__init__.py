"""DPPO and its baselines as policy losses (Qi et al. 2026, Eqs. 11-16)."""

from nemo_dppo.losses.aggregation import aggregate_loss
from nemo_dppo.losses.config import AGGREGATIONS, LossConfig
from nemo_dppo.losses.divergence import binary_kl, binary_tv, topk_kl, topk_tv
from nemo_dppo.losses.modes import LOSS_MODES, TrustRegion, get_mode, register_mode
from nemo_dppo.losses.policy_loss import compute_policy_loss
from nemo_dppo.losses.token_view import TokenView

__all__ = [
    "AGGREGATIONS",
    "LOSS_MODES",
    "LossConfig",
    "TokenView",
    "TrustRegion",
    "aggregate_loss",
    "binary_kl",
    "binary_tv",
    "compute_policy_loss",
    "get_mode",
    "register_mode",
    "topk_kl",
    "topk_tv",
]
