"""Group-relative advantages from scalar rewards (spec "Advantages").

`rewards` [N] and `group_ids` [N] (samples of the same prompt share an id; groups need not be contiguous).
A group of one sample has no baseline to compare with, so its advantage is 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

#: Added to the group std by `grpo` (NeMo-RL / verl use the same order of magnitude).
DEFAULT_STD_EPS = 1e-6


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sample group size, group sum and group sum of squares (float64)."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)}: expected two [N] tensors"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN/inf; expected finite scalar rewards")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    r = rewards.to(torch.float64)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    size = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, r)
    squares = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, r * r)
    return r, size[inverse], total[inverse], squares[inverse]


def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = DEFAULT_STD_EPS) -> torch.Tensor:
    """Dr.GRPO: R − mean_group(R), no std normalisation (the paper's default)."""
    r, size, total, _ = _group_stats(rewards, group_ids)
    adv = torch.where(size > 1, r - total / size, 0.0)
    return adv.to(rewards.dtype)


def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = DEFAULT_STD_EPS) -> torch.Tensor:
    """GRPO: (R − mean_group R) / (std_group R + ε), with the unbiased (n − 1) group std."""
    r, size, total, squares = _group_stats(rewards, group_ids)
    mean = total / size
    var = (squares - size * mean * mean).clamp(min=0) / (size - 1).clamp(min=1)
    adv = torch.where(size > 1, (r - mean) / (var.sqrt() + eps), 0.0)
    return adv.to(rewards.dtype)


def rloo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = DEFAULT_STD_EPS) -> torch.Tensor:
    """RLOO: R_i − mean of the other samples of its group."""
    r, size, total, _ = _group_stats(rewards, group_ids)
    adv = torch.where(size > 1, r - (total - r) / (size - 1).clamp(min=1), 0.0)
    return adv.to(rewards.dtype)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}


def compute_advantages(
    estimator: str, rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = DEFAULT_STD_EPS
) -> torch.Tensor:
    try:
        fn = ADVANTAGE_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown advantage.estimator {estimator!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}"
        ) from None
    return fn(rewards, group_ids, eps)


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N] sequence advantages → [N, T] token advantages (0 outside the response mask)."""
    if advantages.shape != response_mask.shape[:1]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} do not match response_mask {tuple(response_mask.shape)}: "
            "expected [N] and [N, T]"
        )
    return advantages[:, None] * response_mask.to(advantages.dtype)
