"""Rollout samples → one right-padded training batch in next-token coordinates.

Sequence b is prompt + response, right-padded to S. Per-token tensors live on the S − 1 *targets*: index j holds
the prediction of token j + 1, so response token t of sample b (at sequence position P_b + t) sits at
j = P_b − 1 + t. Routes stay in sequence coordinates [N, S, L, k] (one row per forwarded position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from nemo_dppo.engines.base import RolloutSample
from nemo_dppo.losses import MIN_LOGPROB
from nemo_dppo.moe.router_replay import collate_routes


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [N, S] int64, right-padded with pad_id
    attention_mask: torch.Tensor  # [N, S] int64
    response_mask: torch.Tensor  # [N, S-1] bool: targets that are response tokens
    rollout_logprobs: torch.Tensor  # [N, S-1] fp32 log μ (0 off the response)
    advantages: torch.Tensor  # [N] fp32
    rewards: torch.Tensor  # [N] fp32
    group_ids: torch.Tensor  # [N] int64: samples of one prompt share an id
    topk_ids: torch.Tensor | None = None  # [N, S-1, K] int64 (0 off the response)
    topk_rollout_logprobs: torch.Tensor | None = None  # [N, S-1, K] fp32
    routes: torch.Tensor | None = None  # [N, S, L, k] int64, rollout's experts (pads: arange(k))
    route_valid: torch.Tensor | None = None  # [N, S] bool: rows recorded by the rollout
    old_logprobs: torch.Tensor | None = None  # [N, S-1] log π_old, filled before the update

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def target_ids(self) -> torch.Tensor:
        return self.input_ids[:, 1:]

    def select(self, rows: torch.Tensor | slice) -> RolloutBatch:
        """The sub-batch of `rows` (a mini- or micro-batch), every tensor sliced alike."""
        return replace(
            self,
            **{f.name: getattr(self, f.name)[rows] for f in fields(self) if getattr(self, f.name) is not None},
        )


def collate_rollouts(
    samples: Sequence[RolloutSample],
    group_ids: Sequence[int],
    rewards: Sequence[float],
    advantages: torch.Tensor,
    pad_id: int,
) -> RolloutBatch:
    """Pad samples into a `RolloutBatch` (see the module docstring for the layout)."""
    lengths = [int(s.prompt_ids.numel() + s.response_ids.numel()) for s in samples]
    n, seq_len = len(samples), max(lengths)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros(n, seq_len, dtype=torch.int64)
    response_mask = torch.zeros(n, seq_len - 1, dtype=torch.bool)
    rollout_logprobs = torch.zeros(n, seq_len - 1)
    k = samples[0].topk_ids.shape[-1] if samples[0].topk_ids is not None else 0
    topk_ids = torch.zeros(n, seq_len - 1, k, dtype=torch.int64) if k else None
    topk_logprobs = torch.zeros(n, seq_len - 1, k) if k else None
    for b, s in enumerate(samples):
        p, t = int(s.prompt_ids.numel()), int(s.response_ids.numel())
        if p == 0:
            raise ValueError(f"sample {b} has an empty prompt; expected at least one prompt token")
        input_ids[b, :p] = s.prompt_ids
        input_ids[b, p : p + t] = s.response_ids
        attention_mask[b, : p + t] = 1
        targets = slice(p - 1, p - 1 + t)
        response_mask[b, targets] = True
        rollout_logprobs[b, targets] = s.logprobs.float()
        if topk_ids is not None and topk_logprobs is not None:
            topk_ids[b, targets] = s.topk_ids
            # Top-p can give μ = 0 (log −inf) inside the K set; −1e4 is still exactly 0 after exp, and finite.
            topk_logprobs[b, targets] = s.topk_logprobs.float().clamp(min=MIN_LOGPROB)
    routes = route_valid = None
    if all(s.routed_experts is not None for s in samples):
        routes, route_valid = collate_routes([s.routed_experts for s in samples], seq_len)  # type: ignore[misc]
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        rollout_logprobs=rollout_logprobs,
        advantages=advantages.float(),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_ids=torch.tensor(group_ids, dtype=torch.int64),
        topk_ids=topk_ids,
        topk_rollout_logprobs=topk_logprobs,
        routes=routes,
        route_valid=route_valid,
    )
