"""DPPO and its baselines as policy losses (Qi et al. 2026, Eqs. 11-16): the package's public surface.

`dppo.py` is the algorithm (read it first). `baselines.py` registers the comparison modes into the same registry;
importing it here registers every mode whichever submodule a caller imports. `checks.py` and `metrics.py` are
leaves; `compiled.py` is the optional `torch.compile` of the per-token pass, `aliases.py` other frameworks' names.
"""

from nemo_dppo.losses import baselines  # noqa: F401  (registers ppo_clip, cispo, … into LOSS_MODES)
from nemo_dppo.losses.checks import check_policy_loss_inputs, needed_inputs
from nemo_dppo.losses.dppo import (
    AGGREGATIONS,
    DEFAULT_DELTA,
    DEFAULT_TOPK,
    LOG_RATIO_CLAMP,
    LOSS_MODES,
    MIN_LOGPROB,
    PROB_FLOOR,
    RELAX_CHOICES,
    LossConfig,
    LossMode,
    PolicyLossInput,
    TokenView,
    TrustRegion,
    aggregate_loss,
    bernoulli_kl,
    binary_kl,
    binary_tv,
    compute_policy_loss,
    get_mode,
    mismatch_metrics,
    register_mode,
    topk_kl,
    topk_tv,
)
from nemo_dppo.losses.metrics import BAD_UPDATE_PROB_DROP, policy_metrics

__all__ = [
    "AGGREGATIONS",
    "BAD_UPDATE_PROB_DROP",
    "DEFAULT_DELTA",
    "DEFAULT_TOPK",
    "LOG_RATIO_CLAMP",
    "LOSS_MODES",
    "MIN_LOGPROB",
    "PROB_FLOOR",
    "RELAX_CHOICES",
    "LossConfig",
    "LossMode",
    "PolicyLossInput",
    "TokenView",
    "TrustRegion",
    "aggregate_loss",
    "bernoulli_kl",
    "binary_kl",
    "binary_tv",
    "check_policy_loss_inputs",
    "compute_policy_loss",
    "get_mode",
    "mismatch_metrics",
    "needed_inputs",
    "policy_metrics",
    "register_mode",
    "topk_kl",
    "topk_tv",
]
