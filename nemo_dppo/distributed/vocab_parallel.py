"""Log π of the sampled token, π at the rollout's Top-K ids and the entropy from vocabulary-sharded logits.

Tensor parallelism splits the LM head over the vocabulary (Megatron's ColumnParallelLinear / VocabParallelEmbedding
layout): rank r of the TP group holds `logits_shard[..., V/TP]`, the contiguous ids `[r·V/TP, (r+1)·V/TP)`. This
module computes, without ever gathering the full vocabulary on one rank, for every token t with scaled logits
x = logits / T (T = the rollout temperature, applied first, like the distribution μ was sampled from):

- `logprobs`       log π(a_t) = x[a_t] − lse(x),  lse(x) = log Σ_v exp x_v          (differentiable)
- `topk_logprobs`  log π(k) = x[k] − lse(x) at the rollout's K ids                     (no gradient)
- `entropy`        H(π) = lse(x) − Σ_v π_v x_v                                         (no gradient)

Distributed logsumexp: m = all-reduce MAX of the local maxima, then S = all-reduce SUM of Σ_local exp(x − m), so
lse = m + log S. Every id is owned by exactly one rank: the owner contributes x[id] − m from a masked local gather,
the others 0, so the values travel in the same SUM all-reduce — one `[chunk, K + 3]` tensor per chunk (sampled id,
K ids, Σ exp, Σ exp·(x − m)), plus the `[chunk]` MAX. Nothing of size V crosses ranks.

Backward (exact, local, no communication): d log π(a_t) / d logits_v = (1[v = a_t] − π_v) / T, where π_v =
exp(x_v − m) / S is recomputed per chunk from the saved logits and the saved per-token m and S.

Memory: tokens are processed in chunks of `chunk_tokens`. The forward's only temporary proportional to the
vocabulary is one `[chunk_tokens, V/TP]` buffer in the compute dtype (fp32, or fp64 for fp64 logits), reused by
every chunk, also with entropy. The backward returns the gradient `[tokens, V/TP]` in the logits' dtype and, for
fp32/fp64 logits, computes it straight in that tensor (bf16/fp16 logits: through one `[chunk_tokens, V/TP]` fp32
buffer); with `grad_in_logits=True` it writes it into the logits' own storage instead (Megatron's cross-entropy
trick), so the backward then needs no memory proportional to tokens × vocabulary beyond the logits themselves.
Per element: forward 1 read (max) + 1 fused scale-shift pass + exp + sum; backward 1 fused scale-shift pass + exp +
multiply (bf16/fp16 logits: + 1 cast pass each way).

`group=None` means "this process holds the whole vocabulary"; it runs the same code with the collectives skipped,
and equals `nemo_dppo.logprobs.gather_logprobs` up to fp32 rounding (x is formed as logits · (1/T) in one fused pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx, once_differentiable

from nemo_dppo.logprobs import DEFAULT_CHUNK_TOKENS, TokenLogprobs

__all__ = ["VocabShard", "vocab_parallel_logprobs"]


@dataclass(frozen=True)
class VocabShard:
    """Which slice of the vocabulary this rank holds and how to reduce over the TP group."""

    group: dist.ProcessGroup | None
    world_size: int
    vocab_start: int  # first global id of this rank's slice
    vocab_local: int  # V / TP

    @classmethod
    def of(cls, group: dist.ProcessGroup | None, vocab_local: int) -> VocabShard:
        """Rank r of `group` owns ids [r·vocab_local, (r+1)·vocab_local); `group=None` owns all of [0, vocab_local)."""
        if group is None:
            return cls(None, 1, 0, vocab_local)
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of the given TP group")
        return cls(group, dist.get_world_size(group), rank * vocab_local, vocab_local)

    def all_reduce_(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        """In-place all-reduce over the TP group; the identity when the group has one rank."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def localize(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ids → (local column, clamped into range so that gather never fails; whether this rank owns it)."""
        local = ids - self.vocab_start
        owned = (local >= 0) & (local < self.vocab_local)
        return local.clamp_(0, self.vocab_local - 1), owned


def _shifted_into(out: torch.Tensor, raw: torch.Tensor, inv_temperature: float, shift: torch.Tensor) -> torch.Tensor:
    """out = raw · (1/T) − shift[:, None], in out's dtype: one fused pass over [rows, V_local] (out may be raw).

    bf16/fp16 `raw` is first cast into `out` (a second pass): given mixed dtypes, CPU TensorIterator would cast `raw`
    into a hidden fp32 temporary of the chunk's size, invisible to torch's memory accounting.
    """
    if raw.dtype != out.dtype:
        raw = out.copy_(raw)
    return torch.add(shift.neg()[:, None], raw, alpha=inv_temperature, out=out)


def _forward_chunk(
    raw: torch.Tensor,
    ids: torch.Tensor,
    inv_temperature: float,
    with_entropy: bool,
    shard: VocabShard,
    buffer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunk `raw` [c, V_local], global `ids` [c, 1+K] → (m [c], S [c], log π at ids [c, 1+K], entropy [c] or None).

    m = max_v x_v and S = Σ_v exp(x_v − m) over the whole vocabulary, so lse = m + log S. `buffer` [c, V_local] in
    the compute dtype is the only vocabulary-sized memory used (overwritten).
    """
    dtype = buffer.dtype
    # Global max of x = raw / T (T > 0, so max(raw / T) = max(raw) / T, rounded exactly like the elements below).
    shift = raw.amax(dim=-1).to(dtype).mul_(inv_temperature)
    shard.all_reduce_(shift, dist.ReduceOp.MAX)

    n_ids = ids.shape[1]
    # Columns: [x[id] − m for the 1+K ids | Σ exp(x − m) | Σ exp(x − m)·(x − m)], summed over the TP group at once.
    sums = torch.zeros(raw.shape[0], n_ids + 2, dtype=dtype, device=raw.device)
    local, owned = shard.localize(ids)
    picked = raw.gather(1, local).to(dtype)
    sums[:, :n_ids] = _shifted_into(picked, picked, inv_temperature, shift).masked_fill_(~owned, 0.0)
    exp = _shifted_into(buffer, raw, inv_temperature, shift).exp_()  # exp(x − m) ≤ 1
    torch.sum(exp, dim=-1, out=sums[:, n_ids])
    if with_entropy:
        # e·log(e) = e·(x − m) in place (xlogy: 0·log 0 = 0, so −inf logits contribute 0 instead of NaN).
        torch.sum(exp.xlogy_(exp), dim=-1, out=sums[:, n_ids + 1])
    shard.all_reduce_(sums, dist.ReduceOp.SUM)

    total = sums[:, n_ids]
    log_total = total.log()
    logprobs = sums[:, :n_ids] - log_total[:, None]  # (x − m) − log S: rounding scales with |x − m|, not |x|
    # H = −Σ π log π = −Σ (e/S)(z − log S) = log S − Σ e·z / S
    entropy = log_total - sums[:, n_ids + 1] / total if with_entropy else None
    return shift, total, logprobs, entropy


class _VocabParallelLogprobs(torch.autograd.Function):
    """Forward: (log π at target, log π at Top-K ids, entropy); backward: (1[v = a_t] − π_v) / T for the first."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        logits: torch.Tensor,
        target_ids: torch.Tensor,
        topk_ids: torch.Tensor | None,
        temperature: float,
        with_entropy: bool,
        chunk_tokens: int,
        shard: VocabShard,
        grad_in_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = logits.reshape(-1, shard.vocab_local)  # a view for contiguous logits
        n = flat.shape[0]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        ids = target_ids.reshape(n, 1)
        if topk_ids is not None:
            ids = torch.cat([ids, topk_ids.reshape(n, topk_ids.shape[-1])], dim=1)
        new = {"dtype": dtype, "device": logits.device}
        shift, total, logprobs = torch.empty(n, **new), torch.empty(n, **new), torch.empty(n, **new)
        topk = torch.empty(n, ids.shape[1] - 1, **new)
        entropy = torch.empty(n if with_entropy else 0, **new)
        buffer = torch.empty(min(n, chunk_tokens), shard.vocab_local, **new)  # reused: faulted in once, not per chunk
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            raw = flat[rows]
            shift[rows], total[rows], picked, chunk_entropy = _forward_chunk(
                raw, ids[rows], 1.0 / temperature, with_entropy, shard, buffer[: raw.shape[0]]
            )
            logprobs[rows], topk[rows] = picked[:, 0], picked[:, 1:]
            if chunk_entropy is not None:
                entropy[rows] = chunk_entropy
        del buffer

        ctx.save_for_backward(logits, target_ids, shift, total)
        ctx.temperature, ctx.chunk_tokens, ctx.shard, ctx.grad_in_logits = (
            temperature,
            chunk_tokens,
            shard,
            grad_in_logits,
        )
        ctx.mark_non_differentiable(topk, entropy)
        return logprobs, topk, entropy

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_logprobs: torch.Tensor, _grad_topk: torch.Tensor, _grad_entropy: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        logits, target_ids, shift, total = ctx.saved_tensors
        temperature: float = ctx.temperature
        shard: VocabShard = ctx.shard
        flat = logits.reshape(-1, shard.vocab_local)
        n = flat.shape[0]
        # Writing into `flat` reuses the logits' storage (a copy if they were not viewable as [tokens, V_local]).
        grad = flat if ctx.grad_in_logits else torch.empty_like(flat, memory_format=torch.contiguous_format)
        # fp32 / fp64 logits: computed straight in the gradient's rows; lower precision: in one compute-dtype buffer.
        buffer = (
            None
            if grad.dtype == total.dtype
            else torch.empty(min(n, ctx.chunk_tokens), flat.shape[1], dtype=total.dtype, device=flat.device)
        )
        scale = grad_logprobs.reshape(-1).to(total.dtype) / temperature  # d loss / d log π(a_t); 1/T from x = logits/T
        local, owned = shard.localize(target_ids.reshape(-1, 1))
        onehot_scale = torch.where(owned, scale[:, None], 0.0)  # only the owner of a_t adds the 1[v = a_t] term
        softmax_scale = -(scale / total)[:, None]  # π_v = exp(x_v − m) / S
        for start in range(0, n, ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            raw = flat[rows]
            out = grad[rows] if buffer is None else buffer[: raw.shape[0]]
            _shifted_into(out, raw, 1.0 / temperature, shift[rows]).exp_()  # S·π_v on this shard
            out.mul_(softmax_scale[rows]).scatter_add_(1, local[rows], onehot_scale[rows])
            if buffer is not None:
                grad[rows] = out
        return grad.view(logits.shape), None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits_shard: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    topk_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    grad_in_logits: bool = False,
) -> TokenLogprobs:
    """Per-token log π(target) (differentiable), log π at `topk_ids` and H(π) (detached) from vocab-sharded logits.

    `logits_shard` [..., V/TP] (any float dtype; computed in fp32, or fp64 for fp64 logits) holds the global ids
    [r·V/TP, (r+1)·V/TP) on rank r of `group` (`None`: the whole vocabulary, no communication). `target_ids` [...]
    and `topk_ids` [..., K] are global ids in [0, V), identical on every rank of the group. `temperature` divides the
    logits first. Tokens are processed `chunk_tokens` at a time, which bounds the vocabulary-sized temporaries to one
    [chunk_tokens, V/TP] buffer (see the module docstring). Pass logits whose leading dims can be flattened without a
    copy (e.g. [s, b, V/TP] with [s, b] targets rather than a transposed view).

    `grad_in_logits=True` makes the backward write d log π / d logits into the logits' storage instead of a new
    tensor, like Megatron's vocab-parallel cross-entropy: it saves `tokens × V/TP` elements but destroys the logits'
    values when the backward runs. Autograd's version counter turns any later use of them by another backward into an
    error; use it only when nothing else reads the logits after the backward.

    Returns `TokenLogprobs` (`logprobs` [...], `topk_logprobs` [..., K] or None, `entropy` [...] or None).
    """
    if not logits_shard.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits_shard.dtype}")
    if logits_shard.shape[:-1] != target_ids.shape:
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must match logits {tuple(logits_shard.shape)}[:-1]")
    if topk_ids is not None and topk_ids.shape[:-1] != target_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} must be target_ids {tuple(target_ids.shape)} + [K]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be ≥ 1, got {chunk_tokens}")
    shard = VocabShard.of(group, logits_shard.shape[-1])
    logprobs, topk, entropy = _VocabParallelLogprobs.apply(
        logits_shard,
        target_ids.long(),
        None if topk_ids is None else topk_ids.long(),
        float(temperature),
        with_entropy,
        chunk_tokens,
        shard,
        grad_in_logits,
    )
    shape = target_ids.shape
    return TokenLogprobs(
        logprobs=logprobs.reshape(shape),
        topk_logprobs=None if topk_ids is None else topk.reshape(*shape, topk_ids.shape[-1]),
        entropy=entropy.reshape(shape) if with_entropy else None,
    )
