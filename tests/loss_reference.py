"""An independent float64 NumPy transcription of the spec (../shared/docs/dppo-spec.md), for the loss tests.

Written token by token from the spec's formulas, sharing no code with `nemo_dppo.losses`.
"""

from __future__ import annotations

import math

import numpy as np

FLOOR = 1e-12


def bern_kl(mu: float, pi: float) -> float:
    """KL(Bernoulli(μ) ‖ Bernoulli(π)) with 1 − p floored (finite at 0 and 1)."""
    a = mu * (math.log(mu) - math.log(pi)) if mu > 0 else 0.0
    nm, npi = max(1.0 - mu, FLOOR), max(1.0 - pi, FLOOR)
    return max(a + nm * (math.log(nm) - math.log(npi)), 0.0)


def buckets(probs: np.ndarray) -> np.ndarray:
    return np.append(probs, max(1.0 - probs.sum(), FLOOR))


def topk_tv(p_mu: np.ndarray, p_pi: np.ndarray) -> float:
    return 0.5 * float(np.abs(buckets(p_mu) - buckets(p_pi)).sum())


def topk_kl(p_mu: np.ndarray, p_pi: np.ndarray) -> float:
    bm, bp = buckets(p_mu), buckets(p_pi)
    return max(float(np.sum(bm * (np.log(bm) - np.log(bp)))), 0.0)


def token_decision(mode: str, cfg: dict, lp: float, lmu: float, a: float, lold=None, tk_mu=None, tk_pi=None):
    """(keep, weight) of one token, straight from the spec's table."""
    r = math.exp(min(max(lp - lmu, -20.0), 20.0))
    pi, mu = math.exp(lp), math.exp(lmu)
    cap = cfg["ratio_cap"]
    w = min(r, cap)

    def dppo(d: float, anchor_lp: float, dl: float, dh: float) -> bool:
        if a > 0 and lp > anchor_lp and d > dh:
            return False
        return not (a <= 0 and lp < anchor_lp and d > dl)

    def clip_keep(ratio: float) -> bool:
        hi, lo = 1 + cfg["clip_high"], 1 - cfg["clip_low"]
        if cfg.get("relax", "none") != "none" and mu < cfg.get("relax_prob_threshold", 0.0):
            if cfg["relax"] in ("high", "both"):
                hi = math.inf
            if cfg["relax"] in ("low", "both"):
                lo = -math.inf
        if a > 0 and ratio > hi:
            return False
        if a < 0 and ratio < lo:
            return False
        return not (cfg.get("dual_clip") is not None and a < 0 and ratio > cfg["dual_clip"])

    tv_d, kl_d = cfg.get("delta_tv", 0.15), cfg.get("delta_kl", 0.05)
    if mode == "dppo_binary_tv":
        return dppo(abs(pi - mu), lmu, tv_d, tv_d), w
    if mode == "dppo_binary_kl":
        return dppo(bern_kl(mu, pi), lmu, kl_d, kl_d), w
    if mode == "dppo_topk_tv":
        return dppo(topk_tv(np.exp(tk_mu), np.exp(tk_pi)), lmu, tv_d, tv_d), w
    if mode == "dppo_topk_kl":
        return dppo(topk_kl(np.exp(tk_mu), np.exp(tk_pi)), lmu, kl_d, kl_d), w
    if mode == "dppo_binary_tv_decoupled":
        return dppo(abs(pi - math.exp(lold)), lold, tv_d, tv_d), w
    if mode == "dppo_binary_kl_decoupled":
        return dppo(bern_kl(math.exp(lold), pi), lold, kl_d, kl_d), w
    if mode == "ppo_clip":
        return clip_keep(r), w
    if mode == "minirl":
        return clip_keep(math.exp(min(max(lp - lold, -20.0), 20.0))), w
    if mode == "cispo":
        return True, min(min(max(r, 1 - cfg["clip_low"]), 1 + cfg["clip_high"]), cap)
    if mode == "pg_is":
        return True, w
    if mode == "neg_mask":
        return not (a < 0 and mu - pi >= cfg.get("neg_mask_delta", 0.5)), w
    if mode == "neg_mask_decoupled":  # Figure 5's control: the same rule anchored at π_old
        return not (a < 0 and math.exp(lold) - pi >= cfg.get("neg_mask_delta", 0.5)), w
    raise KeyError(mode)


def reference_loss(mode, cfg, lp, lmu, adv, mask, lold=None, tk_mu=None, tk_pi=None, n_tok=None, n_seq=None):
    """(loss, dloss/dlogπ [B, T], keep [B, T]) in float64 for a [B, T] batch."""
    lp, lmu, adv, mask = (np.asarray(x, dtype=np.float64) for x in (lp, lmu, adv, mask))
    if adv.ndim == 1:
        adv = np.repeat(adv[:, None], lp.shape[1], axis=1)
    b, t = lp.shape
    coef = np.zeros((b, t))
    keep = np.ones((b, t), dtype=bool)
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            k, w = token_decision(
                mode,
                cfg,
                lp[i, j],
                lmu[i, j],
                adv[i, j],
                None if lold is None else lold[i, j],
                None if tk_mu is None else tk_mu[i, j],
                None if tk_pi is None else tk_pi[i, j],
            )
            keep[i, j] = k
            coef[i, j] = -adv[i, j] * w if k else 0.0
    agg = cfg.get("agg", "token-mean")
    g = b if n_seq is None else n_seq
    if agg == "token-mean":
        scale = np.full((b, t), 1.0 / (mask.sum() if n_tok is None else n_tok))
    elif agg == "seq-mean-token-sum":
        scale = np.full((b, t), 1.0 / g)
    elif agg == "seq-mean-token-mean":
        scale = np.repeat((1.0 / (g * np.maximum(mask.sum(1), 1)))[:, None], t, axis=1)
    else:
        scale = np.full((b, t), 1.0 / (g * cfg.get("max_response_len", t)))
    return float((coef * scale).sum()), coef * scale, keep
