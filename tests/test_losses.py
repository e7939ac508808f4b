"""The loss core against the spec: an independent float64 reference, hand-derived paper values, gradients."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from nemo_dppo.losses import (
    AGGREGATIONS,
    LOSS_MODES,
    LossConfig,
    PolicyLossInput,
    TrustRegion,
    binary_kl,
    binary_tv,
    compute_policy_loss,
    get_mode,
    mismatch_metrics,
    needed_inputs,
    register_mode,
    topk_kl,
    topk_tv,
)
from tests.loss_reference import bern_kl, reference_loss

ALL_MODES = sorted(LOSS_MODES)


def make_batch(seed: int, b: int = 6, t: int = 7, v: int = 40, k: int = 5, dtype=torch.float64, spread=1.0):
    """A realistic batch: μ and π are full softmaxes over V, tokens sampled from μ, Top-K per the spec."""
    g = torch.Generator().manual_seed(seed)
    logits_mu = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2.5
    logits_pi = logits_mu + torch.randn(b, t, v, generator=g, dtype=torch.float64) * spread
    logits_old = logits_mu + torch.randn(b, t, v, generator=g, dtype=torch.float64) * 0.7
    full_mu, full_pi = logits_mu.log_softmax(-1), logits_pi.log_softmax(-1)
    full_old = logits_old.log_softmax(-1)
    tokens = torch.multinomial(full_mu.exp().reshape(-1, v), 1, generator=g).reshape(b, t)
    ids = full_mu.topk(k, dim=-1).indices
    in_topk = (ids == tokens[..., None]).any(-1)
    ids[..., -1] = torch.where(in_topk, ids[..., -1], tokens)
    pick = lambda full, idx: full.gather(-1, idx)  # noqa: E731
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    adv[0] = 0.0  # A = 0 takes the negative branch
    adv[1] = -1.0
    return {
        "logprobs": pick(full_pi, tokens[..., None])[..., 0].to(dtype),
        "rollout_logprobs": pick(full_mu, tokens[..., None])[..., 0].to(dtype),
        "old_logprobs": pick(full_old, tokens[..., None])[..., 0].to(dtype),
        "topk_rollout_logprobs": pick(full_mu, ids).to(dtype),
        "topk_train_logprobs": pick(full_pi, ids).to(dtype),
        "advantages": adv.to(dtype),
        "mask": mask.to(dtype),
        "full_mu": full_mu,
        "full_pi": full_pi,
        "tokens": tokens,
    }


def ref_cfg(cfg: LossConfig) -> dict:
    d = {
        "clip_low": cfg.clip_low,
        "clip_high": cfg.clip_high,
        "ratio_cap": cfg.ratio_cap,
        "dual_clip": cfg.dual_clip,
        "relax": cfg.relax,
        "relax_prob_threshold": cfg.relax_prob_threshold,
        "neg_mask_delta": cfg.neg_mask_delta,
        "agg": cfg.agg,
        "delta_tv": 0.15 if cfg.delta_low is None else cfg.delta_low,
        "delta_kl": 0.05 if cfg.delta_low is None else cfg.delta_low,
    }
    if cfg.max_response_len is not None:
        d["max_response_len"] = cfg.max_response_len
    return d


def loss_input(batch: dict, logprobs: torch.Tensor | None = None, **kwargs) -> PolicyLossInput:
    """Every input of `batch` (optional ones included) as a PolicyLossInput; `kwargs` override fields."""
    fields = {
        "logprobs": batch["logprobs"] if logprobs is None else logprobs,
        "rollout_logprobs": batch["rollout_logprobs"],
        "advantages": batch["advantages"],
        "response_mask": batch["mask"],
        "old_logprobs": batch["old_logprobs"],
        "topk_rollout_logprobs": batch["topk_rollout_logprobs"],
        "topk_train_logprobs": batch["topk_train_logprobs"],
    }
    return PolicyLossInput(**(fields | kwargs))


def run_both(batch: dict, cfg: LossConfig, **kwargs):
    lp = batch["logprobs"].clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(loss_input(batch, lp, **kwargs), cfg)
    loss.backward()
    ref_loss, ref_grad, ref_keep = reference_loss(
        cfg.mode,
        ref_cfg(cfg),
        batch["logprobs"].double().numpy(),
        batch["rollout_logprobs"].double().numpy(),
        batch["advantages"].double().numpy(),
        batch["mask"].numpy(),
        lold=batch["old_logprobs"].double().numpy(),
        tk_mu=batch["topk_rollout_logprobs"].double().numpy(),
        tk_pi=batch["topk_train_logprobs"].double().numpy(),
        n_tok=kwargs.get("global_num_tokens"),
        n_seq=kwargs.get("global_num_seqs"),
    )
    return loss, lp.grad, metrics, ref_loss, ref_grad, ref_keep


# --- The paper's two examples (Section 4.2) ------------------------------------------------------------------


def _paper_tokens():
    lp = torch.tensor([[math.log(1e-2), math.log(0.80)]], dtype=torch.float64)
    lmu = torch.tensor([[math.log(1e-4), math.log(0.99)]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    return lp, lmu, adv, torch.ones(1, 2)


def test_paper_examples_divergence_values():
    lp, lmu, _, _ = _paper_tokens()
    tv = binary_tv(lmu, lp)[0]
    kl = binary_kl(lmu, lp)[0]
    assert tv[0].item() == pytest.approx(0.0099, abs=1e-12)
    assert tv[1].item() == pytest.approx(0.19, abs=1e-12)
    # Hand-derived from Eq. 14.
    kl0 = 1e-4 * math.log(1e-4 / 1e-2) + (1 - 1e-4) * math.log((1 - 1e-4) / (1 - 1e-2))
    kl1 = 0.99 * math.log(0.99 / 0.80) + 0.01 * math.log(0.01 / 0.20)
    assert kl[0].item() == pytest.approx(kl0, rel=1e-12) and kl0 == pytest.approx(0.00949, abs=1e-5)
    assert kl[1].item() == pytest.approx(kl1, rel=1e-12) and kl1 == pytest.approx(0.1810, abs=1e-4)


@pytest.mark.parametrize(
    ("mode", "kept"),
    [("ppo_clip", [False, True]), ("dppo_binary_tv", [True, False]), ("dppo_binary_kl", [True, False])],
)
def test_paper_examples_masks(mode, kept):
    """μ=1e-4→π=1e-2 (A=+1, r=100): PPO masks, DPPO keeps. μ=0.99→π=0.8 (A=−1, r≈0.808): the reverse."""
    lp, lmu, adv, mask = _paper_tokens()
    lp.requires_grad_(True)
    cfg = LossConfig(mode=mode, clip_low=0.2, clip_high=0.2)
    loss, metrics = compute_policy_loss(PolicyLossInput(lp, lmu, adv, mask, global_num_tokens=1), cfg)
    loss.backward()
    r = torch.exp(lp.detach() - lmu)[0]
    assert r[0].item() == pytest.approx(100.0) and r[1].item() == pytest.approx(0.80 / 0.99)
    expected_grad = [-adv[0, i].item() * r[i].item() if kept[i] else 0.0 for i in range(2)]
    assert lp.grad[0].tolist() == pytest.approx(expected_grad, rel=1e-12)
    assert loss.item() == pytest.approx(sum(expected_grad), rel=1e-12)  # value = −M·r·A summed
    assert metrics["mask_frac"] == 0.5


# --- Every mode against the float64 reference ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_mode_matches_reference(mode, agg, seed):
    batch = make_batch(seed, b=12, t=16, spread=1.5 + 0.5 * seed)
    cfg = LossConfig(mode=mode, agg=agg, max_response_len=19 if agg.endswith("norm") else None)
    loss, grad, _, ref_loss, ref_grad, ref_keep = run_both(batch, cfg)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-13)
    kept = ref_keep[batch["mask"].bool().numpy()]
    if mode not in ("cispo", "pg_is"):  # the batch must exercise both outcomes of every mask
        assert kept.any() and not kept.all(), "batch too easy: the mask decided nothing"


@pytest.mark.parametrize(
    "overrides",
    [
        {"mode": "ppo_clip", "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 1.5},
        {"mode": "ppo_clip", "relax": "both", "relax_prob_threshold": 0.3},
        {"mode": "ppo_clip", "relax": "low", "relax_prob_threshold": 0.3},
        {"mode": "ppo_clip", "relax": "high", "relax_prob_threshold": 0.3},
        {"mode": "dppo_binary_tv", "ratio_cap": 1.5},
        {"mode": "pg_is", "ratio_cap": 1.2},
        {"mode": "dppo_binary_kl", "delta_low": 0.02, "delta_high": 0.02},
        {"mode": "neg_mask", "neg_mask_delta": 0.1},
        {"mode": "cispo", "clip_low": 0.1, "clip_high": 0.1},
    ],
)
def test_mode_options_match_reference(overrides):
    batch = make_batch(3, b=8, t=9, spread=1.5)
    cfg = LossConfig(**overrides)
    loss, grad, metrics, ref_loss, ref_grad, _ = run_both(batch, cfg)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-13)
    if cfg.ratio_cap < 2:
        assert metrics["truncated_frac"] > 0  # the cap is actually exercised


def test_relax_changes_decisions():
    """The relax-α ablation must change which rare tokens are dropped, not just pass through."""
    batch = make_batch(4, b=8, t=9, spread=2.0)
    base = run_both(batch, LossConfig(mode="ppo_clip"))[5]
    relaxed = run_both(batch, LossConfig(mode="ppo_clip", relax="both", relax_prob_threshold=0.5))[5]
    valid = batch["mask"].bool().numpy()
    assert (relaxed[valid] & ~base[valid]).any() and not (~relaxed[valid] & base[valid]).any()


def test_gradient_formula_with_truncation():
    """∂L_t/∂logπ_t = −A·M·min(r, C) / N; a token with r > C keeps weight C (not dropped)."""
    lmu = torch.log(torch.tensor([[1e-3, 0.5, 0.2, 0.9]], dtype=torch.float64))
    lp = torch.log(torch.tensor([[0.5, 0.55, 0.1, 0.3]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0], dtype=torch.float64)
    cfg = LossConfig(mode="pg_is", ratio_cap=3.0)
    loss, metrics = compute_policy_loss(PolicyLossInput(lp, lmu, adv, torch.ones(1, 4)), cfg)
    loss.backward()
    r = (lp.detach() - lmu).exp()[0]
    expected = [-min(x, 3.0) / 4 for x in r.tolist()]
    assert lp.grad[0].tolist() == pytest.approx(expected, rel=1e-12)
    assert r[0].item() == pytest.approx(500.0) and lp.grad[0, 0].item() == pytest.approx(-3.0 / 4)
    assert metrics["truncated_frac"] == 0.25


def test_fp32_inputs_agree_with_fp64():
    b64 = make_batch(5, b=16, t=32, spread=1.0)
    b32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b64.items()}
    for mode in ("dppo_binary_tv", "dppo_topk_kl", "ppo_clip"):
        cfg = LossConfig(mode=mode)
        l64 = run_both(b64, cfg)[0].item()
        l32 = run_both(b32, cfg)[0].item()
        assert l32 == pytest.approx(l64, rel=2e-3, abs=1e-5)


def test_loss_value_sign_convention():
    """A kept token with r = 1 and A = +1 contributes −1 (token-mean over one token)."""
    lp = torch.zeros(1, 1, dtype=torch.float64).log_softmax(-1) + math.log(0.3)
    inputs = PolicyLossInput(lp.requires_grad_(), lp.detach(), torch.ones(1), torch.ones(1, 1))
    loss, _ = compute_policy_loss(inputs, LossConfig())
    assert loss.item() == pytest.approx(-1.0)


# --- Aggregation and data parallel sharding -----------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("mode", ["dppo_binary_tv", "dppo_topk_kl", "ppo_clip"])
def test_sharded_batches_sum_to_whole_batch(agg, mode):
    batch = make_batch(7, b=8, t=6)
    cfg = LossConfig(mode=mode, agg=agg, max_response_len=6 if agg.endswith("norm") else None)
    whole, whole_grad, *_ = run_both(batch, cfg)
    n_tok, n_seq = float(batch["mask"].sum()), 8.0
    shard_losses, shard_grads = [], []
    for rows in (slice(0, 3), slice(3, 8)):  # uneven shards
        shard = {k: v[rows] for k, v in batch.items()}
        loss, grad, *_ = run_both(shard, cfg, global_num_tokens=n_tok, global_num_seqs=n_seq)
        shard_losses.append(loss.item())
        shard_grads.append(grad)
    assert sum(shard_losses) == pytest.approx(whole.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(torch.cat(shard_grads), whole_grad, rtol=1e-12, atol=1e-15)


def test_masked_tokens_stay_in_denominator():
    lp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    lmu = torch.log(torch.tensor([[0.5, 0.99]], dtype=torch.float64))  # 2nd token: π fell by 0.49 → masked for A<0
    loss, metrics = compute_policy_loss(PolicyLossInput(lp, lmu, -torch.ones(1), torch.ones(1, 2)), LossConfig())
    assert metrics["mask_frac"] == 0.5
    assert loss.item() == pytest.approx(1.0 / 2)  # one kept token (r = 1, A = −1) over two tokens


def test_padding_garbage_is_ignored():
    batch = make_batch(8)
    cfg = LossConfig(mode="dppo_topk_tv")
    clean_loss, clean_grad, clean_metrics, *_ = run_both(batch, cfg)
    dirty = dict(batch)
    pad = ~batch["mask"].bool()
    for key in ("logprobs", "rollout_logprobs", "old_logprobs"):
        dirty[key] = batch[key].masked_fill(pad, float("nan"))
    dirty["topk_train_logprobs"] = batch["topk_train_logprobs"].masked_fill(pad[..., None], 5.0)
    loss, grad, metrics, *_ = run_both(dirty, cfg)
    assert loss.item() == clean_loss.item()
    assert torch.equal(grad.nan_to_num(0.0), clean_grad) and metrics == clean_metrics


# --- Divergence estimates ------------------------------------------------------------------------------------


def test_topk_with_k1_equals_binary():
    batch = make_batch(9, k=1)
    lmu, lp = batch["rollout_logprobs"], batch["logprobs"]
    tk_mu, tk_pi = lmu[..., None], lp[..., None]  # K = 1 holding the sampled token
    torch.testing.assert_close(topk_tv(tk_mu, tk_pi), binary_tv(lmu, lp), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(topk_kl(tk_mu, tk_pi), binary_kl(lmu, lp), rtol=1e-9, atol=1e-14)


def test_topk_with_k_equal_vocab_is_exact():
    batch = make_batch(10, v=30)
    full_mu, full_pi = batch["full_mu"], batch["full_pi"]
    exact_tv = 0.5 * (full_mu.exp() - full_pi.exp()).abs().sum(-1)
    exact_kl = (full_mu.exp() * (full_mu - full_pi)).sum(-1)
    torch.testing.assert_close(topk_tv(full_mu, full_pi), exact_tv, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(topk_kl(full_mu, full_pi), exact_kl, rtol=1e-9, atol=1e-12)


def test_topk_matches_reference_buckets():
    from tests.loss_reference import topk_kl as ref_kl
    from tests.loss_reference import topk_tv as ref_tv

    batch = make_batch(11, k=4)
    tk_mu, tk_pi = batch["topk_rollout_logprobs"], batch["topk_train_logprobs"]
    tv, kl = topk_tv(tk_mu, tk_pi), topk_kl(tk_mu, tk_pi)
    for idx in np.ndindex(*tk_mu.shape[:2]):
        pm, pp = tk_mu[idx].exp().numpy(), tk_pi[idx].exp().numpy()
        assert tv[idx].item() == pytest.approx(ref_tv(pm, pp), rel=1e-10, abs=1e-15)
        assert kl[idx].item() == pytest.approx(ref_kl(pm, pp), rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numerical_edges(dtype):
    """μ or π exactly 1, 1e-30, and huge ratios: every divergence, loss and gradient stays finite."""
    probs = [1.0, 1e-30, 0.5, 1.0 - 1e-7, 1e-8]
    pairs = [(m, p) for m in probs for p in probs]
    lmu = torch.tensor([[math.log(m) for m, _ in pairs]], dtype=dtype)
    lp = torch.tensor([[math.log(p) for _, p in pairs]], dtype=dtype)
    for fn in (binary_tv, binary_kl):
        d = fn(lmu, lp)
        assert torch.isfinite(d).all() and (d >= 0).all()
    for (m, p), value in zip(pairs, binary_kl(lmu, lp)[0].tolist(), strict=True):
        if dtype == torch.float64:
            assert value == pytest.approx(bern_kl(m, p), rel=1e-6, abs=1e-12)
    for fn in (topk_tv, topk_kl):
        d = fn(torch.stack([lmu, lmu - 1], -1), torch.stack([lp, lp - 1], -1))
        assert torch.isfinite(d).all()
    for mode in ALL_MODES:
        cfg = LossConfig(mode=mode)
        x = lp.clone().requires_grad_(True)
        adv = torch.tensor([-1.0], dtype=dtype)
        inputs = PolicyLossInput(
            x, lmu, adv, torch.ones_like(lp),
            old_logprobs=lmu, topk_rollout_logprobs=lmu[..., None], topk_train_logprobs=lp[..., None],
        )  # fmt: skip
        loss, metrics = compute_policy_loss(inputs, cfg)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), mode
        assert all(math.isfinite(v) for v in metrics.values()), mode
    r = torch.exp((lp - lmu).clamp(-20, 20))
    assert r.max().item() == pytest.approx(math.exp(20), rel=1e-5)  # log-ratio clamp at ±20


# --- Metrics -------------------------------------------------------------------------------------------------


def test_metrics_against_hand_computation():
    mu = [0.9, 0.2, 0.6, 0.05, 0.7]
    pi = [0.3, 0.4, 0.6, 0.01, 0.1]
    adv = [-1.0, 1.0, -1.0, 1.0, -1.0]
    lmu = torch.tensor([mu], dtype=torch.float64).log()
    lp = torch.tensor([pi], dtype=torch.float64).log()
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    _, m = compute_policy_loss(PolicyLossInput(lp, lmu, torch.tensor([adv], dtype=torch.float64), mask), LossConfig())
    # TV: |Δ| = .6 (A<0, fell → masked), .2 (A>0, rose → masked), 0 (kept), .04 (kept)
    assert m["mask_frac"] == pytest.approx(2 / 4)
    assert m["mask_frac_pos"] == pytest.approx(1 / 2) and m["mask_frac_neg"] == pytest.approx(1 / 2)
    r = [p / q for p, q in zip(pi[:4], mu[:4], strict=True)]
    assert m["ratio_min"] == pytest.approx(min(r)) and m["ratio_max"] == pytest.approx(max(r))
    assert m["ratio_mean"] == pytest.approx(sum(r) / 4)
    lr = [math.log(x) for x in r]
    assert m["mismatch_kl_k1"] == pytest.approx(-sum(lr) / 4)
    assert m["mismatch_kl_k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in lr) / 4)
    assert m["abs_prob_diff_mean"] == pytest.approx((0.6 + 0.2 + 0.0 + 0.04) / 4)
    assert m["abs_prob_diff_max"] == pytest.approx(0.6)
    assert m["bad_update_frac"] == pytest.approx(1 / 4)  # token 0: A<0 and μ−π = 0.6 ≥ 0.5
    assert m["divergence_max"] == pytest.approx(0.6) and m["num_tokens"] == 4


# --- Registry and bad input ----------------------------------------------------------------------------------


def test_registering_a_new_mode_is_one_function():
    @register_mode("test_keep_all_unit_weight")
    def keep_all(view):
        return TrustRegion(torch.ones_like(view.valid), torch.ones_like(view.ratio))

    try:
        batch = make_batch(12)
        lp = batch["logprobs"].clone().requires_grad_(True)
        cfg = LossConfig(mode="test_keep_all_unit_weight", agg="seq-mean-token-sum")
        loss, _ = compute_policy_loss(
            PolicyLossInput(lp, batch["rollout_logprobs"], batch["advantages"], batch["mask"]), cfg
        )
        loss.backward()
        expected = -(batch["advantages"][:, None] * batch["mask"]) / batch["mask"].shape[0]
        torch.testing.assert_close(lp.grad, expected)
    finally:
        del LOSS_MODES["test_keep_all_unit_weight"]


def _every_third(t: torch.Tensor) -> torch.Tensor:
    return torch.arange(t.numel()).reshape(t.shape) % 3 == 0


def _required(batch: dict) -> PolicyLossInput:
    return PolicyLossInput(batch["logprobs"], batch["rollout_logprobs"], batch["advantages"], batch["mask"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x: {"rollout_logprobs": x.rollout_logprobs[:, :-1]}, "rollout_logprobs has shape"),
        (lambda x: {"response_mask": x.response_mask[:, :-1]}, "response_mask has shape"),
        (lambda x: {"advantages": x.advantages[:-1]}, "advantages has shape"),
        (lambda x: {"logprobs": x.logprobs.masked_fill(x.response_mask.bool() & _every_third(x.logprobs), math.nan)},
         "logprobs has"),
        (lambda x: {"rollout_logprobs": x.rollout_logprobs.masked_fill(x.response_mask.bool(), math.inf)},
         "rollout_logprobs has"),
        (lambda x: {"rollout_logprobs": x.rollout_logprobs.masked_fill(x.response_mask.bool(), 0.5)},
         r"log-prob\(s\) > 0"),
        (lambda x: {"topk_train_logprobs": x.topk_train_logprobs[..., :-1]}, "Top-K size"),
        (lambda x: {"topk_train_logprobs": None}, "needs topk"),
        (lambda x: {"global_num_tokens": 0}, "global_num_tokens"),
    ],
)  # fmt: skip
def test_bad_input_raises_one_clear_line(mutate, message):
    batch = make_batch(13)
    inputs = dataclasses.replace(_required(batch), topk_rollout_logprobs=batch["topk_rollout_logprobs"],
                                 topk_train_logprobs=batch["topk_train_logprobs"])  # fmt: skip
    with pytest.raises(ValueError, match=message) as err:
        compute_policy_loss(dataclasses.replace(inputs, **mutate(inputs)), LossConfig(mode="dppo_topk_tv"))
    assert "\n" not in str(err.value)


def test_missing_old_logprobs_is_a_clear_error():
    batch = make_batch(14)
    for mode in ("minirl", "dppo_binary_tv_decoupled", "dppo_binary_kl_decoupled"):
        with pytest.raises(ValueError, match="needs old_logprobs"):
            compute_policy_loss(_required(batch), LossConfig(mode=mode))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "dppo"}, "unknown loss.mode 'dppo'; valid modes: cispo, dppo_binary_kl"),
        ({"agg": "mean"}, "loss.agg='mean' is not one of token-mean"),
        ({"relax": "all"}, "loss.relax"),
        ({"delta_low": 0.0}, "delta_low"),
        ({"dual_clip": 0.9}, "dual_clip"),
        ({"clip_low": 1.0}, "clip_low"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_default_deltas_by_divergence():
    assert LossConfig(mode="dppo_binary_tv").deltas("tv") == (0.15, 0.15)
    assert LossConfig(mode="dppo_binary_kl").deltas("kl") == (0.05, 0.05)
    assert LossConfig(delta_low=0.1).deltas("tv") == (0.1, 0.15)


# --- The call forms and the helpers around the loss ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mismatch_metrics_equal_the_loss_metrics(dtype):
    """`mismatch_metrics` measures the μ‖π mismatch without a loss call, with exactly the loss's numbers."""
    batch = make_batch(16, b=10, t=12, dtype=dtype, spread=2.0)
    pad = ~batch["mask"].bool()
    lp, lmu = batch["logprobs"].masked_fill(pad, math.nan), batch["rollout_logprobs"].masked_fill(pad, 7.0)
    _, from_loss = compute_policy_loss(PolicyLossInput(lp, lmu, batch["advantages"], batch["mask"]), LossConfig())
    measured = mismatch_metrics(lp, lmu, batch["mask"])
    assert list(measured) == ["mismatch_kl_k1", "mismatch_kl_k3", "abs_prob_diff_mean", "abs_prob_diff_max"]
    assert measured == {key: from_loss[key] for key in measured}
    assert measured["mismatch_kl_k1"] > 0 and measured["abs_prob_diff_max"] > measured["abs_prob_diff_mean"] > 0


@pytest.mark.parametrize("mode", ALL_MODES)
def test_needed_inputs_say_what_a_mode_reads(mode):
    """Filling exactly `needed_inputs(mode)` is enough, and each listed input is really required."""
    spec, needed = get_mode(mode), needed_inputs(get_mode(mode))
    assert ("old_logprobs" in needed) == spec.needs_old_logprobs
    assert ("topk_train_logprobs" in needed) == ("topk_rollout_logprobs" in needed) == spec.needs_topk
    batch = make_batch(17)
    given = {name: batch[name] for name in needed}
    loss, _ = compute_policy_loss(dataclasses.replace(_required(batch), **given), LossConfig(mode=mode))
    assert torch.isfinite(loss)
    for name in needed:
        with pytest.raises(ValueError, match="needs"):
            compute_policy_loss(dataclasses.replace(_required(batch), **(given | {name: None})), LossConfig(mode=mode))


# --- loss.compile ---------------------------------------------------------------------------------------------


def test_compile_setting_is_validated():
    with pytest.raises(ValueError, match=r"loss\.compile=.yes. is not one of off, on, auto"):
        LossConfig(compile="yes")
    assert LossConfig().compile == "off"  # compiled fp32 differs in the last ulp: opt-in


@pytest.mark.parametrize("setting", ["auto", "on"])
def test_compile_failure_falls_back_to_eager_or_raises(setting, monkeypatch):
    """`auto` survives a broken torch.compile with one warning and eager's exact results; `on` raises."""
    from nemo_dppo.losses import compiled

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    batch = make_batch(18, dtype=torch.float32)
    eager = run_both(batch, LossConfig(mode="dppo_binary_kl"))
    if setting == "on":
        with pytest.raises(RuntimeError, match=r"loss\.compile=on: torch\.compile failed"):
            run_both(batch, LossConfig(mode="dppo_binary_kl", compile="on"))
        return
    with pytest.warns(UserWarning, match=r"loss\.compile=auto: torch\.compile failed"):
        fallback = run_both(batch, LossConfig(mode="dppo_binary_kl", compile="auto"))
    assert torch.equal(fallback[0], eager[0]) and torch.equal(fallback[1], eager[1]) and fallback[2] == eager[2]
    again = run_both(batch, LossConfig(mode="dppo_binary_kl", compile="auto"))  # eager for good, no new warning
    assert torch.equal(again[1], eager[1])


def test_an_input_error_inside_the_pass_is_the_callers_not_a_compile_failure(monkeypatch):
    """An error eager raises too (here Top-K shapes, unchecked with validate=False) propagates as itself."""
    from nemo_dppo.losses import compiled

    def broken_compile(fn, **kwargs):
        return lambda *args: (_ for _ in ()).throw(RuntimeError("inductor failed"))

    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    batch = make_batch(19)
    cfg = LossConfig(mode="dppo_topk_tv", compile="auto", validate=False)
    bad = loss_input(batch, topk_train_logprobs=batch["topk_train_logprobs"][..., :2])
    with pytest.raises(ValueError, match="Top-K log-prob shapes differ"):
        compute_policy_loss(bad, cfg)
    with pytest.warns(UserWarning, match="torch.compile failed"):  # compile was not given up on the input error
        compute_policy_loss(loss_input(batch), cfg)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dppo_binary_kl", "ppo_clip"])
def test_compiled_pass_matches_reference_and_eager(mode):
    """Compiled: the float64 reference to 1e-10; in fp32 as close to the truth as eager fp32 is (π ≈ μ: k3 and
    1 − π are expm1's regime, where inductor's own expm1 would be off by ~100 %; |π − μ| cancels in both)."""
    cfg = LossConfig(mode=mode, compile="on")
    loss, grad, _, ref_loss, ref_grad, _ = run_both(make_batch(20, b=12, t=16, spread=1.5), cfg)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-13)
    close64 = make_batch(21, b=12, t=16, spread=1e-3)
    close32 = {k: (v.float() if v.is_floating_point() else v) for k, v in close64.items()}
    truth, eager, compiled = (run_both(b, c)[2] for b, c in ((close64, LossConfig(mode=mode)),
                              (close32, LossConfig(mode=mode)), (close32, cfg)))  # fmt: skip
    assert truth["mismatch_kl_k3"] > 0
    for key, exact in truth.items():
        bound = 2 * abs(eager[key] - exact) + 1e-6 * abs(exact) + 1e-12
        assert abs(compiled[key] - exact) <= bound, (key, compiled[key], eager[key], exact)
