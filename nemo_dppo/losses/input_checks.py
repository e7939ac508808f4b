"""Input validation for `compute_policy_loss`: one clear `ValueError` line per problem (what, where, expected)."""

from __future__ import annotations

import torch

from nemo_dppo.losses.modes import LossMode

#: log-probs may exceed 0 by rounding (bf16 log_softmax); anything larger is a bug upstream.
LOGPROB_TOLERANCE = 1e-3


def check_policy_loss_inputs(
    mode: LossMode,
    *,
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    topk_rollout_logprobs: torch.Tensor | None,
    topk_train_logprobs: torch.Tensor | None,
    global_num_tokens: float | torch.Tensor | None,
    global_num_seqs: float | torch.Tensor | None,
) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs has shape {tuple(logprobs.shape)}; expected [B, T]")
    shape = tuple(logprobs.shape)
    _same_shape("rollout_logprobs", rollout_logprobs, shape)
    _same_shape("mask", mask, shape)
    if tuple(advantages.shape) not in (shape, shape[:1]):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected [B]={shape[:1]} or [B, T]={shape}")
    if mode.needs_old_logprobs and old_logprobs is None:
        raise ValueError(f"loss.mode={mode.name!r} needs old_logprobs (log π_old recomputed before the update)")
    if mode.needs_topk and (topk_rollout_logprobs is None or topk_train_logprobs is None):
        raise ValueError(
            f"loss.mode={mode.name!r} needs topk_rollout_logprobs and topk_train_logprobs [B, T, K] "
            "(set rollout.logprobs_topk > 0)"
        )
    if old_logprobs is not None:
        _same_shape("old_logprobs", old_logprobs, shape)
    if topk_rollout_logprobs is not None or topk_train_logprobs is not None:
        if topk_rollout_logprobs is None or topk_train_logprobs is None:
            raise ValueError("only one of topk_rollout_logprobs / topk_train_logprobs was given; expected both")
        for name, t in (("topk_rollout_logprobs", topk_rollout_logprobs), ("topk_train_logprobs", topk_train_logprobs)):
            if t.dim() != 3 or tuple(t.shape[:2]) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B, T, K] with [B, T]={shape}")
        if topk_rollout_logprobs.shape[-1] != topk_train_logprobs.shape[-1]:
            raise ValueError(
                f"Top-K size mismatch: topk_rollout_logprobs has K={topk_rollout_logprobs.shape[-1]}, "
                f"topk_train_logprobs has K={topk_train_logprobs.shape[-1]}; expected the same K token ids"
            )
    for name, count in (("global_num_tokens", global_num_tokens), ("global_num_seqs", global_num_seqs)):
        if count is not None and not float(count) > 0:
            raise ValueError(f"{name}={float(count)} must be > 0 (a global count of valid tokens / sequences)")

    valid = mask.bool()
    _finite("advantages", advantages, valid[:, 0] if advantages.dim() == 1 else valid, check_sign=False)
    for name, t in (
        ("logprobs", logprobs),
        ("rollout_logprobs", rollout_logprobs),
        ("old_logprobs", old_logprobs),
        ("topk_rollout_logprobs", topk_rollout_logprobs),
        ("topk_train_logprobs", topk_train_logprobs),
    ):
        if t is not None:
            _finite(name, t, valid if t.dim() == 2 else valid[..., None], check_sign=True)


def _same_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape} like logprobs [B, T]")


def _finite(name: str, t: torch.Tensor, valid: torch.Tensor, *, check_sign: bool) -> None:
    """Values at valid positions must be finite (and ≤ 0 for log-probs); padding may hold anything.

    One fused pass decides the common case (everything fine, padding included); only a failure pays for the
    position-aware diagnosis.
    """
    t = t.detach()
    ok = (t <= LOGPROB_TOLERANCE) & (t > -torch.inf) if check_sign else torch.isfinite(t)
    if bool(ok.all()):
        return
    bad = valid & ~torch.isfinite(t)
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN/inf value(s) at valid positions (first at index {first}); "
            "expected finite values"
        )
    if check_sign:
        positive = valid & (t > LOGPROB_TOLERANCE)
        if positive.any():
            first = tuple(positive.nonzero()[0].tolist())
            raise ValueError(
                f"{name} has {int(positive.sum())} log-prob(s) > 0 (first at index {first}: "
                f"{float(t[first]):.4g}); expected log-probabilities ≤ 0"
            )
