"""The deprecated call form `compute_policy_loss(logprobs, rollout_logprobs, advantages, mask, cfg, **opt)`.

`nemo_dppo.losses.compute_policy_loss` accepts it beside the one call form `compute_policy_loss(PolicyLossInput(...),
cfg)` and gives identical results. Delete this module (and its import in `__init__`) once every caller has migrated.
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_dppo.losses import dppo
from nemo_dppo.losses.dppo import LossConfig, PolicyLossInput


def compute_policy_loss(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """`dppo.compute_policy_loss(inputs, cfg)`, also accepting the old positional / keyword form."""
    if (args and isinstance(args[0], PolicyLossInput)) or "inputs" in kwargs:
        return dppo.compute_policy_loss(*args, **kwargs)
    return dppo.compute_policy_loss(*_old_form(*args, **kwargs))


def _old_form(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    **optional: Any,
) -> tuple[PolicyLossInput, LossConfig]:
    """The old signature, bound: its keyword-only inputs are the optional `PolicyLossInput` fields."""
    return PolicyLossInput(logprobs, rollout_logprobs, advantages, mask, **optional), cfg
