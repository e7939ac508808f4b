"""One call into the loss core (`nemo_dppo.losses.compute_policy_loss`) for the NeMo-RL adapter and its tests.

The loss core takes one `PolicyLossInput` (its current form) or, in the older form, the same fields as keyword
arguments; this module accepts the fields once and uses whichever form the installed core has.
"""

from __future__ import annotations

import torch

from nemo_dppo import losses
from nemo_dppo.losses import LossConfig


def core_policy_loss(
    cfg: LossConfig,
    *,
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    topk_rollout_logprobs: torch.Tensor | None = None,
    topk_train_logprobs: torch.Tensor | None = None,
    global_num_tokens: float | torch.Tensor | None = None,
    global_num_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics of one (micro-)batch from the loss core (field meanings: `PolicyLossInput`)."""
    optional = {
        "old_logprobs": old_logprobs,
        "topk_rollout_logprobs": topk_rollout_logprobs,
        "topk_train_logprobs": topk_train_logprobs,
        "global_num_tokens": global_num_tokens,
        "global_num_seqs": global_num_seqs,
    }
    input_type = getattr(losses, "PolicyLossInput", None)
    if input_type is not None:
        inputs = input_type(logprobs, rollout_logprobs, advantages, response_mask, **optional)
        return losses.compute_policy_loss(inputs, cfg)
    return losses.compute_policy_loss(logprobs, rollout_logprobs, advantages, response_mask, cfg, **optional)
