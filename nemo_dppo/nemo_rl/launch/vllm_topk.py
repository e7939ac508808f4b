"""vLLM's per-token `{token_id: Logprob}` dicts → Top-K tensors in NeMo-RL's generation-output layout.

With `SamplingParams(logprobs=K)` vLLM returns, for every generated token, a dict holding the K most likely ids
and, when the sampled id is not among them, the sampled id too (K + 1 entries); each value has `.logprob` (after
temperature / top-p with `logprobs_mode="processed_logprobs"`, which NeMo-RL's vLLM worker sets) and `.rank`.
The spec fixes exactly K entries per position: the K most likely, with the sampled id replacing the K-th when it
is outside them (its mass then belongs to the "other" bucket of the Top-K divergences).

NeMo-RL's vLLM worker lays per-token outputs out as `[B, padded_input_length + max_generated]` with the token
generated at step j of sample i stored at column `input_lengths[i] + j` (its `logprobs` output); the Top-K tensors
here use exactly that layout with a trailing K dimension, zeros elsewhere. Only duck typing on vLLM's objects: no
vLLM import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nemo_dppo.losses import MIN_LOGPROB

#: log μ stored for ids vLLM reports at −inf (filtered by top-k / top-p): the loss core's one floor.
LOGPROB_FLOOR = MIN_LOGPROB


def topk_with_sampled(entries: Mapping[int, Any], sampled_id: int, k: int) -> tuple[list[int], list[float]]:
    """One position: K ids and log-probs, most likely first, the sampled id in the last slot when outside the K."""
    if len(entries) < k:
        raise ValueError(
            f"vLLM returned {len(entries)} log-probs for a token, fewer than K={k}: was SamplingParams(logprobs=K) set?"
        )
    ranked = sorted(entries.items(), key=lambda item: (-_logprob(item[1]), _rank(item[1]), item[0]))
    ids = [token_id for token_id, _ in ranked[:k]]
    if sampled_id not in ids:
        if sampled_id not in entries:
            raise ValueError(f"vLLM's log-probs do not include the sampled token {sampled_id}")
        ids[-1] = sampled_id
    return ids, [max(_logprob(entries[token_id]), LOGPROB_FLOOR) for token_id in ids]


def sequence_topk(
    step_logprobs: Sequence[Mapping[int, Any] | None], token_ids: Sequence[int], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, K] int64 ids and [n, K] float32 log-probs for one generated sequence of n tokens."""
    n = len(token_ids)
    ids = torch.zeros(n, k, dtype=torch.long)
    logprobs = torch.zeros(n, k, dtype=torch.float32)
    if len(step_logprobs) < n:
        raise ValueError(f"vLLM returned log-probs for {len(step_logprobs)} of {n} generated tokens")
    for step, (entries, token_id) in enumerate(zip(step_logprobs, token_ids, strict=False)):
        if not entries:
            raise ValueError(f"vLLM returned no log-probs for generated token {step}: was logprobs=K requested?")
        step_ids, step_logprobs_k = topk_with_sampled(entries, int(token_id), k)
        ids[step] = torch.tensor(step_ids)
        logprobs[step] = torch.tensor(step_logprobs_k)
    return ids, logprobs


def batch_topk(
    request_outputs: Sequence[Any], input_lengths: Sequence[int] | torch.Tensor, padded_input_length: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, padded_input_length + max_generated, K] ids / log μ in NeMo-RL's layout, from vLLM `RequestOutput`s.

    `request_outputs[i].outputs[0]` is sample i's completion (`.token_ids`, `.logprobs`), as NeMo-RL's worker
    reads it; `input_lengths[i]` its unpadded prompt length.
    """
    completions = [output.outputs[0] for output in request_outputs]
    max_generated = max((len(c.token_ids) for c in completions), default=0)
    total = padded_input_length + max_generated
    ids = torch.zeros(len(completions), total, k, dtype=torch.long)
    logprobs = torch.zeros(len(completions), total, k, dtype=torch.float32)
    for i, completion in enumerate(completions):
        generated = list(completion.token_ids)
        if not generated:
            continue
        start = int(input_lengths[i])
        seq_ids, seq_logprobs = sequence_topk(completion.logprobs or [], generated, k)
        ids[i, start : start + len(generated)] = seq_ids
        logprobs[i, start : start + len(generated)] = seq_logprobs
    return ids, logprobs


def _logprob(entry: Any) -> float:
    """vLLM's `Logprob.logprob` (a bare float is accepted too)."""
    return float(getattr(entry, "logprob", entry))


def _rank(entry: Any) -> int:
    rank = getattr(entry, "rank", None)
    return 1 << 30 if rank is None else int(rank)
