"""DPPO (Qi et al. 2026, arXiv 2602.04879) in one file: config, divergences, trust-region mask, surrogate, aggregation.

Top to bottom: `LossConfig`, divergences (Eqs. 13–16), `TokenView`, `TrustRegion` + registry, DPPO modes (Eq. 12),
`compute_policy_loss` (Eq. 11). A mode only decides (keep M, weight w) per token, without gradient; all share the
surrogate. Baselines register into the same registry from `baselines.py`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nemo_dppo.losses.aliases import resolve_mode_name, unknown_mode_message
from nemo_dppo.losses.checks import check_loss_config, check_policy_loss_inputs, check_topk_pair
from nemo_dppo.losses.compiled import COMPILE_CHOICES, per_token_pass
from nemo_dppo.losses.metrics import ValidTokens, mismatch_values, policy_metrics, reduce_metrics

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RELAX_CHOICES = ("none", "low", "high", "both")
DEFAULT_DELTA = {"tv": 0.15, "kl": 0.05}  # δ when delta_low / delta_high are unset, by divergence (spec "Defaults")
LOG_RATIO_CLAMP = 20.0  # |log r| is clamped to this before exponentiation (spec "Notation")
DEFAULT_TOPK = 20  # K of the Top-K modes when a run does not set it (spec "Defaults")
MIN_LOGPROB = -1e4  # log μ kept for ids a rollout gives −inf (top-p): finite for the checks, exp() == 0 in any dtype
PROB_FLOOR = 1e-12  # floor of a probability under a log or as a bucket mass (1 − p, "other"): finite at 0 and 1
Count = float | torch.Tensor | None  # a token / sequence count: a number or a 0-dim tensor


@dataclass
class LossConfig:
    """The `loss:` section, with the paper's defaults (spec "Defaults"). A mode ignores the fields it does not use."""

    mode: str = "dppo_binary_tv"  # a name in LOSS_MODES
    delta_low: float | None = None  # DPPO δ for A ≤ 0 (Eq. 12); None → DEFAULT_DELTA of the mode's divergence
    delta_high: float | None = None  # DPPO δ for A > 0
    clip_low: float = 0.2  # PPO ratio range ε_low / ε_high (GRPO 0.2/0.2, clip-higher 0.2/0.28); minirl, cispo
    clip_high: float = 0.28
    dual_clip: float | None = None  # dual-clip c > 1 for ppo_clip: mask A < 0 with r > c; None = off
    ratio_cap: float = 1e4  # truncated-IS cap C of the weight min(r, C) (Eq. 11); 1e4 = off in practice
    agg: str = "token-mean"  # one of AGGREGATIONS (spec "Aggregation")
    max_response_len: int | None = None  # the length of seq-mean-token-sum-norm (Dr.GRPO); None → the batch's T
    relax_prob_threshold: float = 0.0  # relax-α ablation (Sec. 6): tokens with μ < α lose the `relax` bound(s)
    relax: str = "none"  # one of RELAX_CHOICES
    neg_mask_delta: float = 0.5  # neg_mask (Sec. 5.3): mask A < 0 tokens with μ − π ≥ δ
    validate: bool = True  # check inputs (shapes, NaN/inf, log-probs ≤ 0) on every call
    compile: str = "off"  # torch.compile the per-token pass: off | on | auto (compiled.py; last-ulp differences)

    def __post_init__(self) -> None:
        self.mode = get_mode(resolve_mode_name(self.mode)[0]).name  # other frameworks' names: aliases.py
        check_loss_config(self, {"agg": AGGREGATIONS, "relax": RELAX_CHOICES, "compile": COMPILE_CHOICES})

    def deltas(self, divergence: str) -> tuple[float, float]:
        """(δ_low, δ_high) for a mode measuring `divergence` ("tv" or "kl"), defaults filled in."""
        low, high = (DEFAULT_DELTA[divergence] if d is None else d for d in (self.delta_low, self.delta_high))
        return low, high


# --- Divergence estimates (Section 4.4): elementwise over leading dims, from log-probs ≤ 0 ------------------------
def binary_tv(rollout_logprobs: torch.Tensor, train_logprobs: torch.Tensor) -> torch.Tensor:
    """Binary total variation |π − μ| of the sampled token (Eq. 13)."""
    return (torch.exp(train_logprobs) - torch.exp(rollout_logprobs)).abs()


def binary_kl(rollout_logprobs: torch.Tensor, train_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(μ) ‖ Bernoulli(π)) of the sampled token (Eq. 14)."""
    log_mu, log_pi = rollout_logprobs.clamp(max=0.0), train_logprobs.clamp(max=0.0)
    return bernoulli_kl(log_mu, log_pi, torch.exp(log_mu), torch.exp(log_pi))


def bernoulli_kl(log_mu: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Eq. 14 from log-probs (≤ 0) and probs: μ·(log μ − log π) + (1−μ)·(log(1−μ) − log(1−π)).

    1 − p = −expm1(log p) keeps its precision as p → 1; floored at PROB_FLOOR, finite when μ or π is 0 or 1.
    Both are kept negated (p − 1): the signs cancel exactly in the ratio, so no pass negates them."""
    e_mu = torch.expm1(log_mu).clamp_(max=-PROB_FLOOR)  # −(1 − μ)
    e_pi = torch.expm1(log_pi).clamp_(max=-PROB_FLOOR)  # −(1 − π)
    second = e_pi.reciprocal_().mul_(e_mu).log_().mul_(e_mu)  # −(1−μ)·log((1−μ)/(1−π)), in place
    first = torch.sub(log_mu, log_pi).mul_(mu)  # μ·(log μ − log π)
    return first.sub_(second).clamp_(min=0.0)  # ≥ 0 analytically; removes −1e-9 rounding


def _other_bucket(probs: torch.Tensor) -> torch.Tensor:
    """The mass outside the K tokens, 1 − Σ_k p_k, floored at PROB_FLOOR."""
    return (1.0 - probs.sum(dim=-1)).clamp(min=PROB_FLOOR)


def topk_tv(topk_rollout_logprobs: torch.Tensor, topk_train_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K total variation ½ Σ|p_μ − p_π| over the K tokens plus the "other" bucket (Eq. 15)."""
    check_topk_pair(topk_rollout_logprobs, topk_train_logprobs)
    p_mu, p_pi = torch.exp(topk_rollout_logprobs), torch.exp(topk_train_logprobs)
    in_topk = (p_mu - p_pi).abs().sum(dim=-1)
    return 0.5 * (in_topk + (_other_bucket(p_mu) - _other_bucket(p_pi)).abs())


def topk_kl(topk_rollout_logprobs: torch.Tensor, topk_train_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K KL(μ ‖ π) over the K tokens plus the "other" bucket (Eq. 16)."""
    check_topk_pair(topk_rollout_logprobs, topk_train_logprobs)
    log_mu, log_pi = topk_rollout_logprobs.clamp(max=0.0), topk_train_logprobs.clamp(max=0.0)
    p_mu = torch.exp(log_mu)
    other_mu, other_pi = _other_bucket(p_mu), _other_bucket(torch.exp(log_pi))
    in_topk = (p_mu * (log_mu - log_pi)).sum(dim=-1)
    return (in_topk + other_mu * torch.log(other_mu / other_pi)).clamp(min=0.0)


@dataclass
class PolicyLossInput:
    """One (micro-)batch for `compute_policy_loss`: log-probs of the sampled tokens; only `logprobs` has gradient."""

    logprobs: torch.Tensor  # [B, T] log π under the policy being trained
    rollout_logprobs: torch.Tensor  # [B, T] log μ of the rollout engine that sampled the tokens (the anchor)
    advantages: torch.Tensor  # [B] (broadcast over tokens) or [B, T]
    response_mask: torch.Tensor  # [B, T] bool or 0/1; elsewhere (padding) inputs may hold anything
    old_logprobs: torch.Tensor | None = None  # [B, T] log π_old recomputed before the update (decoupled, minirl)
    topk_rollout_logprobs: torch.Tensor | None = None  # [B, T, K] log μ at the rollout's K ids (Top-K modes)
    topk_train_logprobs: torch.Tensor | None = None  # [B, T, K] log π at the same ids, without gradient
    global_num_tokens: Count = None  # replaces this batch's token count (DP, micro-batches)
    global_num_seqs: Count = None  # replaces this batch's sequence count G


def clamped_log_ratio(log_pi: torch.Tensor, log_anchor: torch.Tensor) -> torch.Tensor:
    """log(π / anchor), clamped to ±LOG_RATIO_CLAMP so that r = exp(·) stays finite."""
    return (log_pi - log_anchor).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@dataclass(eq=False)
class TokenView:
    """The detached per-token quantities modes and metrics read, computed once, in fp32 (fp64 if π is fp64).

    Padding of [B, T] inputs is 0; Top-K [B, T, K] is only cast (its padding reaches only masked `where`s)."""

    log_pi: torch.Tensor  # log π(a_t)
    log_mu: torch.Tensor  # log μ(a_t) of the rollout engine (the DPPO anchor)
    advantages: torch.Tensor  # A_t
    valid: torch.Tensor  # bool response mask
    cfg: LossConfig
    log_old: torch.Tensor | None  # log π_old(a_t) (decoupled modes)
    topk_log_mu: torch.Tensor | None  # log μ at the rollout's K ids
    topk_log_pi: torch.Tensor | None  # log π at the same ids
    log_ratio: torch.Tensor  # log r = log π − log μ, clamped
    ratio: torch.Tensor  # r = π / μ (Eq. 11)
    truncated_ratio: torch.Tensor  # min(r, C): the weight of every ratio-weighted mode (Eq. 11, truncation)
    pi: torch.Tensor
    mu: torch.Tensor
    binary_tv: torch.Tensor  # |π − μ| (Eq. 13), also the mismatch metric `abs_prob_diff`
    positive: torch.Tensor  # A > 0
    negative: torch.Tensor  # A < 0

    @classmethod
    def of(cls, inputs: PolicyLossInput, cfg: LossConfig) -> TokenView:
        dtype = torch.float64 if inputs.logprobs.dtype == torch.float64 else torch.float32
        valid = inputs.response_mask.bool()
        adv = inputs.advantages[:, None] if inputs.advantages.dim() == 1 else inputs.advantages

        def clean(x: torch.Tensor | None, pad: bool = True) -> torch.Tensor | None:
            x = None if x is None else x.detach().to(dtype)
            return torch.where(valid, x, 0) if pad and x is not None else x

        log_pi, log_mu, adv = clean(inputs.logprobs), clean(inputs.rollout_logprobs), clean(adv.expand_as(valid))
        log_ratio, pi, mu = clamped_log_ratio(log_pi, log_mu), torch.exp(log_pi), torch.exp(log_mu)
        ratio = torch.exp(log_ratio)
        topk = clean(inputs.topk_rollout_logprobs, False), clean(inputs.topk_train_logprobs, False)
        return cls(log_pi, log_mu, adv, valid, cfg, clean(inputs.old_logprobs), *topk, log_ratio, ratio,
                   ratio.clamp(max=cfg.ratio_cap), pi, mu, (pi - mu).abs(), adv > 0, adv < 0)  # fmt: skip


# --- Trust-region modes and their registry --------------------------------------------------------------------
@dataclass
class TrustRegion:
    """A mode's decision. `keep` is M (bool); `weight` is w; `divergence` is the D the mask thresholded."""

    keep: torch.Tensor
    weight: torch.Tensor
    divergence: torch.Tensor | None = None


ModeFn = Callable[[TokenView], TrustRegion]


@dataclass(frozen=True)
class LossMode:
    """A registered mode: its `loss.mode` name, its function, the optional inputs it reads (`checks.needed_inputs`)."""

    name: str
    fn: ModeFn
    needs_old_logprobs: bool = False
    needs_topk: bool = False


LOSS_MODES: dict[str, LossMode] = {}


def register_mode(name: str, *, needs_old_logprobs: bool = False, needs_topk: bool = False) -> Callable[..., ModeFn]:
    """Register a trust-region mode under `name` (its `loss.mode` config value)."""

    def decorator(fn: ModeFn) -> ModeFn:
        if name in LOSS_MODES:
            raise ValueError(f"loss mode {name!r} is registered twice")
        LOSS_MODES[name] = LossMode(name, fn, needs_old_logprobs, needs_topk)
        return fn

    return decorator


def get_mode(name: str) -> LossMode:
    """The registered mode `name`; an unknown name fails listing the valid ones."""
    if name not in LOSS_MODES:
        raise ValueError(unknown_mode_message(name, LOSS_MODES))
    return LOSS_MODES[name]


def dppo_region(view: TokenView, log_anchor: torch.Tensor, divergence: torch.Tensor, name: str) -> TrustRegion:
    """Eq. 12, weight min(r, C): drop A > 0 with π > anchor and D > δ_high, A ≤ 0 with π < anchor and D > δ_low."""
    low, high = view.cfg.deltas(name)
    away = torch.where(view.positive, view.log_pi > log_anchor, view.log_pi < log_anchor)  # π moves away, by A
    beyond = divergence > high if low == high else torch.where(view.positive, divergence > high, divergence > low)
    return TrustRegion(~(away & beyond), view.truncated_ratio, divergence)


@register_mode("dppo_binary_tv")
def dppo_binary_tv(view: TokenView) -> TrustRegion:
    """DPPO with Binary-TV |π − μ| (Eq. 13), anchored at the rollout policy μ."""
    return dppo_region(view, view.log_mu, view.binary_tv, "tv")


@register_mode("dppo_binary_kl")
def dppo_binary_kl(view: TokenView) -> TrustRegion:
    """DPPO with Binary-KL (Eq. 14), anchored at μ."""
    return dppo_region(view, view.log_mu, bernoulli_kl(view.log_mu, view.log_pi, view.mu, view.pi), "kl")


@register_mode("dppo_topk_tv", needs_topk=True)
def dppo_topk_tv(view: TokenView) -> TrustRegion:
    """DPPO with Top-K TV (Eq. 15) over TopK(μ) ∪ {a_t} plus "other"; direction from the sampled token."""
    return dppo_region(view, view.log_mu, topk_tv(view.topk_log_mu, view.topk_log_pi), "tv")


@register_mode("dppo_topk_kl", needs_topk=True)
def dppo_topk_kl(view: TokenView) -> TrustRegion:
    """DPPO with Top-K KL(μ‖π) (Eq. 16)."""
    return dppo_region(view, view.log_mu, topk_kl(view.topk_log_mu, view.topk_log_pi), "kl")


# --- The surrogate (Eq. 11) and its aggregation ---------------------------------------------------------------
def compute_policy_loss(inputs: PolicyLossInput, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 11 with any registered mode: loss L = agg(−A_t · M_t · w_t) and its metrics for one (micro-)batch.

    Implemented as L_t = c_t · (1 + logπ_t − sg(logπ_t)) with the detached coefficient c_t = −A_t · M_t · w_t:
    the value is exactly c_t and ∂L_t/∂logπ_t exactly c_t, whatever the mode (no exp on the gradient path).
    """
    mode = get_mode(cfg.mode)
    if cfg.validate:
        check_policy_loss_inputs(inputs, mode)
    view = TokenView.of(inputs, cfg)
    coefficient, keep, divergence = per_token_pass(decide, mode, cfg)(view)
    log_pi = torch.where(view.valid, inputs.logprobs.to(view.log_pi.dtype), 0)  # padding may hold NaN
    token_loss = coefficient * (1 + log_pi - log_pi.detach())
    loss = aggregate_loss(token_loss, view.valid, cfg.agg, inputs.global_num_tokens, inputs.global_num_seqs,
                          cfg.max_response_len)  # fmt: skip
    return loss, policy_metrics(view, keep, divergence) | {"loss": float(loss.detach())}


def decide(mode: LossMode, cfg: LossConfig, view: TokenView) -> tuple[torch.Tensor, ...]:
    """The mode's decision and c_t = −A_t · M_t · w_t, without gradient (what `loss.compile` fuses)."""
    region = mode.fn(view)
    coefficient = torch.where(region.keep & view.valid, -view.advantages * region.weight, 0)
    return coefficient, region.keep, region.divergence


def aggregate_loss(
    token_loss: torch.Tensor, valid: torch.Tensor, agg: str, global_num_tokens: Count = None,
    global_num_seqs: Count = None, max_response_len: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """`token_loss` [B, T] (0 where not `valid`) → scalar: token-mean Σ L / N, seq-mean-token-sum Σ L / G,

    seq-mean-token-mean Σ_i (Σ_t L / n_i) / G, Dr.GRPO's seq-mean-token-sum-norm Σ L / (G · max_response_len).
    Masked tokens stay in N. Pass global N, G under data parallelism: per-rank losses then add up to the whole.
    """
    num_seqs = _at_least_one(token_loss.shape[0] if global_num_seqs is None else global_num_seqs)
    if agg == "token-mean":
        return token_loss.sum() / _at_least_one(valid.sum() if global_num_tokens is None else global_num_tokens)
    if agg == "seq-mean-token-sum":
        return token_loss.sum() / num_seqs
    if agg == "seq-mean-token-mean":
        return (token_loss.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)).sum() / num_seqs
    if agg == "seq-mean-token-sum-norm":
        return token_loss.sum() / (num_seqs * (token_loss.shape[-1] if max_response_len is None else max_response_len))
    raise ValueError(f"unknown loss.agg {agg!r}; valid: {', '.join(AGGREGATIONS)}")


def _at_least_one(count: float | torch.Tensor) -> float | torch.Tensor:
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)


def mismatch_metrics(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """`mismatch_kl_k1/k3`, `abs_prob_diff_mean/max` exactly as `compute_policy_loss` reports them, without a loss."""
    no_advantages = train_logprobs.new_zeros(train_logprobs.shape[:1])
    view = TokenView.of(PolicyLossInput(train_logprobs, rollout_logprobs, no_advantages, response_mask), LossConfig())
    return reduce_metrics(mismatch_values(ValidTokens(view.valid), view.log_ratio, view.binary_tv))
