"""Log π of the sampled tokens (with gradient), π at the rollout's Top-K ids and the entropy (without) from logits.

`gather_logprobs` is the plain autograd formulation, kept as the readable reference that tests and
`tools/bench_topk.py` compare against; the engines use `nemo_dppo.distributed.vocab_parallel.vocab_parallel_logprobs`
(same values, exact hand-written backward, less memory, also for vocabulary-sharded logits).

Works chunk by chunk over tokens on the logits the forward already holds: log-probs are gathered logits minus a
logsumexp, so no full fp32 [tokens, vocab] log-softmax is materialised next to the logits. Logits are divided by
the rollout temperature first, like the distribution μ was sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Tokens per chunk: bounds the temporary [chunk, vocab] fp32 buffers (Qwen3: 4096 × 151,936 × 4 B ≈ 2.5 GB).
DEFAULT_CHUNK_TOKENS = 4096


@dataclass
class TokenLogprobs:
    logprobs: torch.Tensor  # [..., ] log π(target), differentiable
    topk_logprobs: torch.Tensor | None  # [..., K] log π at the given ids, detached
    entropy: torch.Tensor | None  # [..., ] H(π), detached


def gather_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    topk_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TokenLogprobs:
    """`logits` [..., V]; `target_ids` [...]; `topk_ids` [..., K]. Returns per-token log π (see `TokenLogprobs`)."""
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_targets = target_ids.reshape(-1)
    flat_topk = None if topk_ids is None else topk_ids.reshape(flat_targets.numel(), -1)
    picked, topk, entropy = [], [], []
    for start in range(0, flat_targets.numel(), chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        scaled = flat_logits[rows].float()
        if temperature != 1.0:
            scaled = scaled / temperature
        lse = torch.logsumexp(scaled, dim=-1)
        picked.append(scaled.gather(-1, flat_targets[rows, None]).squeeze(-1) - lse)
        with torch.no_grad():
            if flat_topk is not None:
                topk.append(scaled.detach().gather(-1, flat_topk[rows]) - lse.detach()[:, None])
            if with_entropy:
                probs = torch.softmax(scaled.detach(), dim=-1)
                entropy.append(lse.detach() - (probs * scaled.detach()).sum(-1))
    shape = target_ids.shape
    return TokenLogprobs(
        logprobs=torch.cat(picked).reshape(shape),
        topk_logprobs=torch.cat(topk).reshape(*shape, -1) if flat_topk is not None else None,
        entropy=torch.cat(entropy).reshape(shape) if with_entropy else None,
    )
