"""Input checks for `compute_policy_loss` and validation of `LossConfig` (a leaf: imports only torch).

Every problem is one `ValueError` line saying what is wrong, where, and what was expected. Objects are read by
attribute (a `PolicyLossInput`, a `LossMode`, a `LossConfig`), so this module needs none of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

#: log-probs may exceed 0 by rounding (bf16 log_softmax); anything larger is a bug upstream.
LOGPROB_TOLERANCE = 1e-3


def check_known_keys(section: str, given: Iterable[str], valid: Sequence[str]) -> None:
    """Unknown config keys fail loudly, naming the valid ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {section}; valid keys: {', '.join(valid)}")


def check_loss_config(cfg: Any, choices: Mapping[str, Sequence[str]]) -> None:
    """Ranges of the `loss:` fields; `choices` maps a field name to its allowed values (agg, relax, compile)."""
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            raise ValueError(f"loss.{name}={getattr(cfg, name)!r} is not one of {', '.join(valid)}")
    for name in ("delta_low", "delta_high"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ValueError(f"loss.{name}={value} must be > 0 (a divergence threshold δ)")
    if not 0 <= cfg.clip_low < 1:
        raise ValueError(f"loss.clip_low={cfg.clip_low} must be in [0, 1) (ratio lower bound 1 − ε_low > 0)")
    if not cfg.clip_high >= 0:
        raise ValueError(f"loss.clip_high={cfg.clip_high} must be ≥ 0")
    if cfg.dual_clip is not None and not cfg.dual_clip > 1:
        raise ValueError(f"loss.dual_clip={cfg.dual_clip} must be > 1 (or null to disable)")
    if not cfg.ratio_cap > 0:
        raise ValueError(f"loss.ratio_cap={cfg.ratio_cap} must be > 0 (C of the truncated IS weight)")
    if cfg.max_response_len is not None and not cfg.max_response_len > 0:
        raise ValueError(f"loss.max_response_len={cfg.max_response_len} must be a positive token count")
    if not 0 <= cfg.relax_prob_threshold <= 1:
        raise ValueError(f"loss.relax_prob_threshold={cfg.relax_prob_threshold} must be a probability")
    if not cfg.neg_mask_delta > 0:
        raise ValueError(f"loss.neg_mask_delta={cfg.neg_mask_delta} must be > 0")


def check_topk_pair(topk_rollout_logprobs: torch.Tensor, topk_train_logprobs: torch.Tensor) -> None:
    """The two Top-K tensors hold log μ and log π at the same K token ids: same shape."""
    if topk_rollout_logprobs.shape != topk_train_logprobs.shape:
        raise ValueError(
            f"Top-K log-prob shapes differ: rollout {tuple(topk_rollout_logprobs.shape)} vs train "
            f"{tuple(topk_train_logprobs.shape)}; expected the same [..., K] over the rollout's K token ids"
        )


def needed_inputs(mode: Any) -> tuple[str, ...]:
    """The optional `PolicyLossInput` fields a `LossMode` reads: the caller must fill exactly these."""
    topk = ("topk_rollout_logprobs", "topk_train_logprobs") if mode.needs_topk else ()
    return ("old_logprobs",) * mode.needs_old_logprobs + topk


def check_policy_loss_inputs(inputs: Any, mode: Any) -> None:
    """Shapes, the optional inputs `mode` needs, global counts, and finite log-probs ≤ 0 at valid positions."""
    logprobs, mask = inputs.logprobs, inputs.response_mask
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs has shape {tuple(logprobs.shape)}; expected [B, T]")
    shape = tuple(logprobs.shape)
    _same_shape("rollout_logprobs", inputs.rollout_logprobs, shape)
    _same_shape("response_mask", mask, shape)
    if tuple(inputs.advantages.shape) not in (shape, shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(inputs.advantages.shape)}; expected [B]={shape[:1]} or [B, T]={shape}"
        )
    _check_optional_inputs(inputs, mode, shape)
    for name in ("global_num_tokens", "global_num_seqs"):
        count = getattr(inputs, name)
        if count is not None and not float(count) > 0:
            raise ValueError(f"{name}={float(count)} must be > 0 (a global count of valid tokens / sequences)")

    valid = mask.bool()
    advantages = inputs.advantages
    _finite("advantages", advantages, valid[:, 0] if advantages.dim() == 1 else valid, check_sign=False)
    for name in ("logprobs", "rollout_logprobs", "old_logprobs", "topk_rollout_logprobs", "topk_train_logprobs"):
        t = getattr(inputs, name)
        if t is not None:
            _finite(name, t, valid if t.dim() == 2 else valid[..., None], check_sign=True)


def _check_optional_inputs(inputs: Any, mode: Any, shape: tuple[int, ...]) -> None:
    old, tk_mu, tk_pi = inputs.old_logprobs, inputs.topk_rollout_logprobs, inputs.topk_train_logprobs
    missing = [name for name in needed_inputs(mode) if getattr(inputs, name) is None]
    if "old_logprobs" in missing:
        raise ValueError(f"loss.mode={mode.name!r} needs old_logprobs (log π_old recomputed before the update)")
    if missing:
        raise ValueError(
            f"loss.mode={mode.name!r} needs topk_rollout_logprobs and topk_train_logprobs [B, T, K] "
            "(set rollout.logprobs_topk > 0)"
        )
    if old is not None:
        _same_shape("old_logprobs", old, shape)
    if tk_mu is None and tk_pi is None:
        return
    if tk_mu is None or tk_pi is None:
        raise ValueError("only one of topk_rollout_logprobs / topk_train_logprobs was given; expected both")
    for name, t in (("topk_rollout_logprobs", tk_mu), ("topk_train_logprobs", tk_pi)):
        if t.dim() != 3 or tuple(t.shape[:2]) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B, T, K] with [B, T]={shape}")
    if tk_mu.shape[-1] != tk_pi.shape[-1]:
        raise ValueError(
            f"Top-K size mismatch: topk_rollout_logprobs has K={tk_mu.shape[-1]}, "
            f"topk_train_logprobs has K={tk_pi.shape[-1]}; expected the same K token ids"
        )


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
