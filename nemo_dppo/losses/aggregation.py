"""Loss aggregation over a [B, T] token grid (spec "Aggregation"; masked tokens stay in the denominator).

With data parallelism pass the *global* denominators: then per-rank losses add up to the whole-batch loss.
"""

from __future__ import annotations

import torch

from nemo_dppo.losses.config import AGGREGATIONS


def aggregate_loss(
    token_loss: torch.Tensor,
    valid: torch.Tensor,
    agg: str,
    *,
    global_num_tokens: float | torch.Tensor | None = None,
    global_num_seqs: float | torch.Tensor | None = None,
    max_response_len: int | None = None,
) -> torch.Tensor:
    """Reduce `token_loss` [B, T] (already 0 where `valid` is False) to a scalar.

    token-mean:               Σ L / N_tokens
    seq-mean-token-sum:       Σ L / G
    seq-mean-token-mean:      Σ_i (Σ_t L / n_i) / G
    seq-mean-token-sum-norm:  Σ L / (G · max_response_len)      (Dr.GRPO)
    N_tokens and G default to this batch's valid-token and sequence counts.
    """
    num_seqs = token_loss.shape[0] if global_num_seqs is None else global_num_seqs
    if agg == "token-mean":
        num_tokens = valid.sum() if global_num_tokens is None else global_num_tokens
        return token_loss.sum() / _at_least_one(num_tokens)
    if agg == "seq-mean-token-sum":
        return token_loss.sum() / _at_least_one(num_seqs)
    if agg == "seq-mean-token-mean":
        per_seq_tokens = valid.sum(dim=-1).clamp(min=1)
        return (token_loss.sum(dim=-1) / per_seq_tokens).sum() / _at_least_one(num_seqs)
    if agg == "seq-mean-token-sum-norm":
        length = token_loss.shape[-1] if max_response_len is None else max_response_len
        return token_loss.sum() / (_at_least_one(num_seqs) * length)
    raise ValueError(f"unknown loss.agg {agg!r}; valid: {', '.join(AGGREGATIONS)}")


def _at_least_one(count: float | torch.Tensor) -> float | torch.Tensor:
    """An empty batch gives loss 0 rather than 0/0."""
    if isinstance(count, torch.Tensor):
        return count.clamp(min=1)
    return max(count, 1)
