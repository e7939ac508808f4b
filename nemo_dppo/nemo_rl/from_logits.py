"""log π of the next tokens and π at the rollout's Top-K ids from the logits NeMo-RL hands a loss.

NeMo-RL passes logits in two situations: v0.5's API (every loss gets `next_token_logits` [B, S, V/TP] plus
`vocab_parallel_rank`, `vocab_parallel_group`, `context_parallel_group`) and v0.6+'s LOGIT input type (`logits=`,
no groups: the Megatron worker's vocabulary-sharded logits, the TP group is Megatron's). In both, the logits are
already divided by the generation temperature (NeMo-RL scales them in place before the loss), position t predicts
token t + 1, and with sequence packing the slice can be longer than the unpadded sequence. Here:

    log π[b, t]     = log softmax(logits[b, t])[input_ids[b, t + 1]]      t < S − 1   (differentiable)
    log π_K[b, t, k] = log softmax(logits[b, t])[topk_ids[b, t + 1, k]]               (no gradient)

computed by `nemo_dppo.distributed.vocab_parallel.vocab_parallel_logprobs` without gathering the vocabulary.
Context parallelism (sequence sharded over CP ranks) is not supported on this path: it fails with a clear error.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch
import torch.distributed as dist

from nemo_dppo.distributed.vocab_parallel import vocab_parallel_logprobs
from nemo_dppo.logprobs import DEFAULT_CHUNK_TOKENS, TokenLogprobs


class UnsupportedParallelism(RuntimeError):
    """A parallel layout this path cannot handle (context parallelism)."""


def next_token_logprobs_from_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    topk_ids: torch.Tensor | None = None,
    vocab_parallel_group: dist.ProcessGroup | None = None,
    context_parallel_group: dist.ProcessGroup | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TokenLogprobs:
    """`logits` [B, S', V/TP] (S' ≥ S), `input_ids` [B, S], `topk_ids` [B, S, K] (global ids, aligned with input_ids).

    Returns `logprobs` [B, S − 1] and `topk_logprobs` [B, S − 1, K] (or None). With `vocab_parallel_group=None`
    the group is taken from Megatron's parallel state when this process runs inside an initialised Megatron model
    with TP > 1 (v0.6+'s LOGIT input type passes no group); otherwise the logits must hold the whole vocabulary.
    """
    _reject_context_parallel(context_parallel_group)
    logits = _local_logits(logits)
    group = vocab_parallel_group if vocab_parallel_group is not None else _megatron_tp_group()
    seq_len = input_ids.shape[1]
    if logits.dim() != 3 or logits.shape[0] != input_ids.shape[0] or logits.shape[1] < seq_len:
        raise ValueError(
            f"logits have shape {tuple(logits.shape)}; expected [B, S' ≥ S, V] with input_ids [B, S]="
            f"{tuple(input_ids.shape)}"
        )
    # Targets padded to the logits' length instead of slicing the logits: slicing [:, :S − 1] would force a copy of
    # the [B, S', V/TP] logits (vocab_parallel_logprobs flattens the leading dims); the extra positions cost one
    # token each and get zero gradient (their outputs are sliced away below).
    targets = input_ids.new_zeros(logits.shape[:2])
    targets[:, : seq_len - 1] = input_ids[:, 1:]
    topk = None
    if topk_ids is not None:
        topk = topk_ids.new_zeros(*logits.shape[:2], topk_ids.shape[-1])
        topk[:, : seq_len - 1] = topk_ids[:, 1:]
    out = vocab_parallel_logprobs(logits, targets, group=group, topk_ids=topk, chunk_tokens=chunk_tokens)
    return TokenLogprobs(
        logprobs=out.logprobs[:, : seq_len - 1],
        topk_logprobs=None if out.topk_logprobs is None else out.topk_logprobs[:, : seq_len - 1],
        entropy=None,
    )


def _local_logits(logits: torch.Tensor) -> torch.Tensor:
    """A DTensor (NeMo-RL's DTensor/automodel worker) is gathered to a full-vocabulary tensor (differentiably)."""
    full_tensor = getattr(logits, "full_tensor", None)
    if callable(full_tensor) and type(logits).__name__ == "DTensor":
        return full_tensor()
    return logits


def _reject_context_parallel(group: dist.ProcessGroup | None) -> None:
    size = dist.get_world_size(group) if group is not None else _megatron_cp_size()
    if size > 1:
        raise UnsupportedParallelism(
            f"DPPOLossFn from logits does not support context parallelism (CP={size}); set "
            "policy.megatron_cfg.context_parallel_size=1 (binary DPPO modes with NeMo-RL ≥ 0.6 take log-probs and "
            "work with any CP)"
        )


def _megatron_tp_group() -> dist.ProcessGroup | None:
    """Megatron's TP group when a Megatron model is initialised in this process with TP > 1, else None."""
    parallel_state = _megatron_parallel_state()
    if parallel_state is None or parallel_state.get_tensor_model_parallel_world_size() <= 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _megatron_cp_size() -> int:
    parallel_state = _megatron_parallel_state()
    return 1 if parallel_state is None else int(parallel_state.get_context_parallel_world_size())


def _megatron_parallel_state() -> ModuleType | None:
    """`megatron.core.parallel_state` if a Megatron model is initialised in this process, else None.

    Looked up in `sys.modules`, not imported: a process that initialised Megatron has imported it already, and
    importing megatron.core just to find out costs seconds.
    """
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state
